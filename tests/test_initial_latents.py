"""``Segmenter.run(..., initial_latents=X)``: X replaces the drawn initial noise."""
import numpy as np
import pytest

from msld_sdk import Segmenter, _native
from msld_sdk.errors import InputError


@pytest.fixture(scope="module")
def seg(tiny_plan):
    return Segmenter(tiny_plan, backend="onnxruntime")


def _latent_shape(seg):
    lat = seg.plan.manifest["latent"]
    return (int(lat["channels"]), *lat["size"])


def test_drawn_noise_given_explicitly_gives_the_seeded_run(seg, rng):
    img = rng.random((40, 40), dtype=np.float32)
    shape = _latent_shape(seg)
    x0 = _native.gaussian(7, 0, 3, int(np.prod(shape)), 0).reshape(3, *shape)
    seeded = seg.run(img, k=3, steps=6, seed=7)
    given = seg.run(img, k=3, steps=6, seed=12345, initial_latents=x0)
    np.testing.assert_array_equal(seeded.probs, given.probs)


def test_given_latents_decide_the_run_at_eta_0(seg, rng):
    img = rng.random((40, 40), dtype=np.float32)
    x0 = rng.standard_normal((2, *_latent_shape(seg))).astype(np.float32)
    a = seg.run(img, k=2, steps=5, seed=1, initial_latents=x0)
    b = seg.run(img, k=2, steps=5, seed=2, initial_latents=x0.astype(np.float64))
    np.testing.assert_array_equal(a.probs, b.probs)
    c = seg.run(img, k=2, steps=5, seed=1, initial_latents=x0 + 0.5)
    assert not np.array_equal(a.probs, c.probs)


def test_batch_forms_agree(seg, rng):
    imgs = [rng.random((40, 40), dtype=np.float32) for _ in range(2)]
    x0 = rng.standard_normal((4, *_latent_shape(seg))).astype(np.float32)
    whole = seg.run(imgs, k=2, steps=4, initial_latents=x0)
    listed = seg.run(imgs, k=2, steps=4, initial_latents=[x0[:2], x0[2:]])
    single = seg.run(imgs[1], k=2, steps=4, initial_latents=x0[2:])
    for w, l in zip(whole, listed):
        np.testing.assert_array_equal(w.probs, l.probs)
    np.testing.assert_allclose(whole[1].probs, single.probs, atol=1e-6)


@pytest.mark.parametrize("bad, why", [
    (lambda s: np.zeros((3, *s), np.float32), "shape"),
    (lambda s: np.zeros((2, s[0], s[1] + 1, s[2]), np.float32), "shape"),
    (lambda s: np.full((2, *s), np.nan, np.float32), "NaN"),
    (lambda s: np.zeros((2, *s), np.int32), "floating"),
    (lambda s: [np.zeros((2, *s), np.float32)] * 2, "one per image"),
])
def test_bad_initial_latents_raise_input_error(seg, rng, bad, why):
    with pytest.raises(InputError, match=why):
        seg.run(rng.random((40, 40), dtype=np.float32), k=2, steps=2, initial_latents=bad(_latent_shape(seg)))
