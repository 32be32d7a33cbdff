"""Image hardening: what users pass as images, and the clear errors for what cannot work."""

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt.runtime.images import ImagePreprocessor
from helpers.engines import clip_processor_class


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    d = tmp_path_factory.mktemp("processor")
    clip_processor_class()(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(str(d))
    return ImagePreprocessor(d, image_size=56)


def _rgb(rng, h=70, w=60):
    return torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()


def test_pil_path_array_and_tensor_agree(pre, rng, tmp_path):
    array = _rgb(rng)
    path = tmp_path / "img.png"
    Image.fromarray(array).save(path)
    as_pil = pre(Image.fromarray(array))
    for other in (str(path), path, array, torch.from_numpy(array), array.astype(np.float32) / 255.0):
        np.testing.assert_allclose(pre(other), as_pil, atol=1e-6)
    batch = pre([array, Image.fromarray(array)])
    assert batch.shape == (2, 3, 56, 56) and batch.dtype == np.float32
    assert np.isfinite(batch).all()


def test_rgba_and_grayscale_pil_images_become_rgb(pre, rng):
    array = _rgb(rng)
    rgba = Image.fromarray(np.dstack([array, np.full(array.shape[:2], 255, np.uint8)]))
    np.testing.assert_allclose(pre(rgba), pre(Image.fromarray(array)), atol=1e-6)
    assert pre(Image.fromarray(array[:, :, 0])).shape == (1, 3, 56, 56)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((20, 20, 4), np.uint8), "3 channels"),
        (np.zeros((20, 20, 1), np.uint8), "3 channels"),
        (np.zeros((20, 20), np.uint8), "rank 3"),
        (np.zeros((1, 1, 20, 20, 3), np.uint8), "rank 3"),
        (np.zeros((0, 20, 3), np.uint8), "zero-size"),
        (np.zeros((20, 0, 3), np.uint8), "zero-size"),
        (np.full((20, 20, 3), np.nan, np.float32), "NaN or Inf"),
        (np.full((20, 20, 3), np.inf, np.float32), "NaN or Inf"),
        (np.full((20, 20, 3), 2.0, np.float32), r"must lie in \[0, 1\]"),
        (np.zeros((20, 20, 3), np.int16), "uint8, uint16 or floating"),
    ],
)
def test_bad_arrays_are_named(pre, bad, match):
    with pytest.raises((ValueError, TypeError), match=f"image 0: .*{match}|{match}"):
        pre([bad])


def test_bad_image_in_a_batch_is_named_by_index(pre, rng):
    with pytest.raises(ValueError, match="image 1: .*NaN"):
        pre([_rgb(rng), np.full((8, 8, 3), np.nan, np.float32)])


def test_empty_batch(pre):
    with pytest.raises(ValueError, match="empty batch"):
        pre([])


def test_unreadable_and_non_image_paths(pre, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pre(tmp_path / "missing.jpg")
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image")
    with pytest.raises(ValueError, match="notes.jpg is not an image"):
        pre(str(text))
    with pytest.raises(TypeError, match="expected a PIL image"):
        pre([object()])
