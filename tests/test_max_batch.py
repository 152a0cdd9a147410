"""A long list runs in groups of whole images of at most ``max_batch`` hypotheses (memory stays
bounded: before, 20 images at k=16 went through ONNX Runtime as one 320-row batch), and the
results are exactly those of one batch: each image's noise depends only on the seed."""
import numpy as np
import pytest

from msld_sdk import Segmenter
from msld_sdk.errors import InputError


def _images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((size, size)).astype(np.float32) for _ in range(n)]


def _spy_rows(seg):
    """Record the hypotheses (rows) of every sampling call of ``seg``'s backend."""
    rows, sample = [], seg.backend.sample

    def spy(cond, n_images, options, *a, **kw):
        rows.append(n_images * options.k)
        return sample(cond, n_images, options, *a, **kw)
    seg.backend.sample = spy
    return rows


@pytest.mark.parametrize("views", [1, 2])
def test_groups_equal_one_batch(tiny_plan, views):
    imgs = _images(7)
    one = Segmenter(tiny_plan, max_batch=7 * 3)
    grouped = Segmenter(tiny_plan, max_batch=7)    # 7 // k=3 -> groups of 2 images
    rows_one, rows_grouped = _spy_rows(one), _spy_rows(grouped)
    a = one.run(imgs, k=3, steps=3, seed=11, views=views)
    b = grouped.run(imgs, k=3, steps=3, seed=11, views=views)
    assert rows_one == [21] and rows_grouped == [6, 6, 6, 3]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.probs, y.probs)
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_array_equal(x.confidence, y.confidence)
    assert b[0].timings["images"] == 7 and b[-1].timings == b[0].timings


def test_groups_take_their_own_initial_latents(tiny_plan):
    imgs = _images(5, seed=1)
    seg = Segmenter(tiny_plan, max_batch=4)        # k=2: groups of 2 images
    lat = np.random.default_rng(3).standard_normal((5 * 2, *seg.plan.latent_shape)).astype(np.float32)
    grouped = seg.run(imgs, k=2, steps=2, initial_latents=lat)
    for i, r in enumerate(grouped):
        alone = seg.run(imgs[i], k=2, steps=2, initial_latents=lat[2 * i:2 * i + 2])
        np.testing.assert_array_equal(r.probs, alone.probs)


def test_k_above_max_batch_keeps_an_image_whole(tiny_plan):
    seg = Segmenter(tiny_plan, max_batch=2)
    rows = _spy_rows(seg)
    seg.run(_images(2), k=5, steps=1, seed=0)
    assert rows == [5, 5]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_max_batch_must_be_a_positive_whole_number(tiny_plan, bad):
    with pytest.raises(InputError, match="max_batch must be a positive whole number"):
        Segmenter(tiny_plan, max_batch=bad)
