"""Test-time views (``msld_sdk.views``): hypothesis j of a run with ``views=V`` is the plain
model's hypothesis for the image turned by view ``j % V``, from the same initial noise, turned back."""
import shutil

import numpy as np
import pytest

from msld_sdk import Segmenter, _native
from msld_sdk.errors import InputError, PlanFormatError
from msld_sdk.views import apply_view, check_views, hypothesis_rows, undo_view, undo_views, view_inputs


def _turn_hwc(img: np.ndarray, v: int) -> np.ndarray:
    """View v of an H x W (x C) image, written independently of msld_sdk.views: a quarter turn
    counter-clockwise v % 4 times, then a left-right mirror for v >= 4."""
    y = np.rot90(img, v % 4, axes=(0, 1))
    return y[:, ::-1] if v >= 4 else y


@pytest.fixture(scope="module")
def seg(tiny_rgb_plan):
    return Segmenter(tiny_rgb_plan, backend="onnxruntime", threads=1)


def test_views_are_the_eight_symmetries_of_the_square(rng):
    x = rng.random((2, 5, 5))
    seen = [apply_view(x, v) for v in range(8)]
    for v in range(8):
        np.testing.assert_array_equal(undo_view(seen[v], v), x)
        np.testing.assert_array_equal(seen[v][0], _turn_hwc(x[0], v))
    assert len({s.tobytes() for s in seen}) == 8    # all distinct on a generic array


def test_rows_and_layout():
    # 2 images, k = 5, V = 3: hypothesis j of image i uses row i*3 + j % 3
    assert hypothesis_rows(2, 5, 3).tolist() == [0, 1, 2, 0, 1, 3, 4, 5, 3, 4]
    x = np.arange(2 * 1 * 2 * 2, dtype=np.float32).reshape(2, 1, 2, 2)
    vi = view_inputs(x, 4)
    assert vi.shape == (8, 1, 2, 2)
    for i in range(2):
        for v in range(4):
            np.testing.assert_array_equal(vi[i * 4 + v], apply_view(x[i], v))
    planes = np.stack([apply_view(np.arange(4.0).reshape(2, 2), j % 4) for j in range(6)])
    np.testing.assert_array_equal(undo_views(planes, k=6, views=4), np.tile(np.arange(4.0).reshape(2, 2), (6, 1, 1)))


def test_hypothesis_j_is_the_plain_model_on_the_turned_image(seg, rng):
    H, W = seg.plan.image_size
    img = rng.random((H, W, 3), dtype=np.float32)      # at the model's size: no resize to blur the check
    k, V, seed = 6, 4, 11
    r = seg.run(img, k=k, steps=4, seed=seed, views=V)
    assert r.views == V and r.probs.shape[0] == k
    shape = seg.plan.latent_shape
    x0 = _native.gaussian(seed, 0, k, int(np.prod(shape)), 0).reshape(k, *shape)   # the seed's noise
    for j in range(k):
        v = j % V
        plain = seg.run(_turn_hwc(img, v), k=1, steps=4, initial_latents=x0[j:j + 1], views=1)
        back = np.rot90((plain.probs[0][:, ::-1] if v >= 4 else plain.probs[0]), -(v % 4))
        np.testing.assert_allclose(r.probs[j], back, atol=2e-5)
    # different views really differ from the plain run (the tiny model is not rotation invariant)
    assert not np.allclose(r.probs, seg.run(img, k=k, steps=4, seed=seed, views=1).probs, atol=1e-3)


def test_hypothesis_j_does_not_depend_on_k(seg, rng):
    img = rng.random((37, 45, 3), dtype=np.float32)
    a = seg.run(img, k=3, steps=3, seed=5, views=4)
    b = seg.run(img, k=7, steps=3, seed=5, views=4)
    np.testing.assert_allclose(a.probs, b.probs[:3], atol=2e-5)


def test_batch_of_images_matches_one_by_one(seg, rng):
    imgs = [rng.random((40, 40, 3), dtype=np.float32) for _ in range(2)]
    x0 = rng.standard_normal((6, *seg.plan.latent_shape)).astype(np.float32)
    both = seg.run(imgs, k=3, steps=3, views=2, initial_latents=x0)
    for i in range(2):
        one = seg.run(imgs[i], k=3, steps=3, views=2, initial_latents=x0[3 * i:3 * i + 3])
        np.testing.assert_allclose(both[i].probs, one.probs, atol=2e-5)


@pytest.mark.parametrize("bad", [0, 9, 2.0, True, "4"])
def test_bad_views_are_refused(seg, bad):
    with pytest.raises(InputError, match="views must be an integer from 1 to 8"):
        seg.run(np.zeros((16, 16, 3), np.float32), k=1, steps=1, views=bad)


def test_non_square_model_input_refuses_turns():
    with pytest.raises(InputError, match="square model input"):
        check_views(4, (128, 96))
    assert check_views(1, (128, 96)) == 1


def test_plan_default_views(tiny_rgb_plan, tmp_path, rng):
    from msld_export.plan_writing.set_defaults import set_defaults
    p = tmp_path / "views.plan"
    shutil.copy(tiny_rgb_plan, p)
    m = set_defaults(p, views=4, why="test")
    assert m["defaults"]["views"] == 4 and m["provenance"]["defaults_changed"]["to"]["views"] == 4
    s = Segmenter(p, backend="onnxruntime", threads=1)
    img = rng.random((24, 24, 3), dtype=np.float32)
    d = s.run(img, k=4, steps=2, seed=3)
    assert d.views == 4
    np.testing.assert_array_equal(d.probs, s.run(img, k=4, steps=2, seed=3, views=4).probs)
    assert s.run(img, k=4, steps=2, seed=3, views=1).views == 1
    with pytest.raises(InputError, match="views must be"):
        set_defaults(p, views=0)


def test_plan_with_invalid_default_views_is_refused(tiny_rgb_plan, tmp_path):
    from msld_sdk.plan import Plan, add_blobs
    p = tmp_path / "bad.plan"
    shutil.copy(tiny_rgb_plan, p)
    add_blobs(p, {}, {"defaults": dict(Plan.open(p).manifest["defaults"], views=12)})
    with pytest.raises(PlanFormatError, match="views"):
        Plan.open(p)
