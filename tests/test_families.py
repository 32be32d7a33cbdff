"""One conformance test for every model family in the table: a tiny checkpoint of the family, saved
with save_pretrained and built *by path* (the route real checkpoints take), must give, through the
runtime, per image:

- rows: with --no-apet exactly Transformers' own image features for that image (the family's
  `reference_rows`, computed with the Hugging Face model's own methods), max |diff| <= 1e-5;
- positions: with --no-apet 0..R-1; with ApET ascending, unique, inside the uncompressed rows, one
  per kept row, and fewer rows than without;
- placeholders: the prompt holds exactly one contiguous run of image-token ids per image, as long
  as that image's rows;
- the same result through `Pipeline.generate` (num_patches = uncompressed rows, num_kept = rows).

Images of three shapes (square, wide, tall): families whose rows depend on the image must follow.
Families that take videos (`media` holds "video") are checked the same way on the real clip
(assets/big_buck_bunny.mp4): --no-apet rows equal the family's `reference_video_rows` on the frames
Transformers' own `load_video` samples. Media a family does not compress (`compressed_media`, e.g.
Video-LLaVA's still images) must come out of the ApET engine exactly as without ApET.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops.compat import load_image_processor
from apet_trt.engine_format import family_facts, known_families
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models import FAMILIES as EXPORT_FAMILIES
from apet_trt.export.models import family_class
from apet_trt.export.presets import PRESETS, load_preset
from apet_trt.runtime.families import FAMILIES as RUNTIME_FAMILIES

CLIP = Path(__file__).resolve().parents[1] / "assets" / "big_buck_bunny.mp4"
SHAPES = {"square": (300, 300), "wide": (420, 180), "tall": (160, 400)}  # (width, height)


def test_both_sides_list_the_same_families():
    assert sorted(EXPORT_FAMILIES) == sorted(RUNTIME_FAMILIES) == known_families()


@pytest.mark.parametrize("name", sorted(EXPORT_FAMILIES))
def test_both_adapters_name_the_family_manifest_facts_of_the_format(name):
    """A family's manifest fields are declared once (engine_format/families/<family>.py) and both of its
    adapters name that declaration; the export side writes the section the facts name."""
    from apet_trt.runtime.families import family_class as runtime_class

    facts = family_facts(name)
    assert family_class(name).facts is facts and runtime_class(name).facts is facts
    assert family_class(name).name == runtime_class(name).name == name


def _tiny_preset(family: str) -> str:
    names = [n for n, p in PRESETS.items() if p.family == family and n.startswith("tiny-")]
    assert names, f"family {family!r} has no tiny-* preset for the tests"
    return names[0]


@pytest.fixture(scope="module", params=sorted(EXPORT_FAMILIES))
def family_engines(request, tmp_path_factory):
    """(family name, checkpoint dir, --no-apet engine, ApET engine) built from a saved checkpoint."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    loaded = load_preset(_tiny_preset(name))
    ckpt = root / "checkpoint"
    loaded.model.save_pretrained(str(ckpt))
    loaded.processor.save_pretrained(str(ckpt))
    loaded.tokenizer.save_pretrained(str(ckpt))
    n = family_class(name)(loaded.config, loaded.processor).num_patches  # the most rows an image can have
    keep = max(11, n // 4)
    full = root / "full"
    build(BuildConfig(model=str(ckpt), out=str(full), no_apet=True, max_batch=4), quiet=True)
    comp = root / "apet"
    build(BuildConfig(model=str(ckpt), out=str(comp), keep=keep, basis=10, max_batch=4), quiet=True)
    return name, ckpt, full, comp


@pytest.fixture(scope="module")
def images():
    g = np.random.default_rng(0)
    return {k: Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for k, (w, h) in SHAPES.items()}


def _reference(name, ckpt, pil=None, videos=None):
    import transformers

    cls = family_class(name)
    config = transformers.AutoConfig.from_pretrained(str(ckpt))
    model = getattr(transformers, cls.hf_model_class).from_pretrained(str(ckpt)).eval()
    family = cls(config)
    if videos is not None:
        return family.reference_video_rows(model, load_image_processor(ckpt), videos)
    return family.reference_rows(model, load_image_processor(ckpt), pil)


def _takes_video(name) -> bool:
    return "video" in family_class(name).media


def test_no_apet_video_rows_equal_transformers_own_features(family_engines):
    name, ckpt, full, _ = family_engines
    if not _takes_video(name):
        pytest.skip(f"the {name} family takes no videos")
    from transformers.video_utils import load_video

    pipe = runtime.load(full, backend="onnxruntime")
    [rows] = pipe.encode(videos=str(CLIP))
    frames, _ = load_video(str(CLIP), num_frames=pipe.family.frames_per_video, backend="pyav")
    [reference] = _reference(name, ckpt, videos=[frames])
    assert rows.media == "video" and rows.embeddings.shape == reference.shape, name
    assert float((rows.embeddings - reference).abs().max()) <= 1e-5, name
    assert rows.num_patches == rows.num_rows and torch.equal(rows.positions, torch.arange(rows.num_rows))


def test_apet_video_rows_positions_and_placeholders(family_engines):
    name, _, full, comp = family_engines
    if not _takes_video(name):
        pytest.skip(f"the {name} family takes no videos")
    pipe, base = runtime.load(comp, backend="onnxruntime"), runtime.load(full, backend="onnxruntime")
    [r], [u] = pipe.encode(videos=str(CLIP)), base.encode(videos=str(CLIP))
    assert r.num_patches == u.num_rows and 0 < r.num_rows < u.num_rows, name
    assert r.positions.unique().numel() == r.num_rows and r.embeddings.shape[0] == r.num_rows
    assert 0 <= int(r.positions.min()) and int(r.positions.max()) < r.num_patches
    a = pipe.assemble("What happens?", [r])
    slots = torch.nonzero(a.input_ids == int(pipe.manifest.llm["video_token_id"])).flatten()
    assert slots.numel() == r.num_rows and bool((slots.diff() == 1).all()), name
    [res] = pipe.generate(prompts="What happens?", videos=str(CLIP), max_new_tokens=2)
    assert (res.num_kept, res.num_patches, res.positions) == (r.num_rows, r.num_patches, r.positions.tolist())


def test_no_apet_rows_equal_transformers_own_features(family_engines, images):
    name, ckpt, full, _ = family_engines
    pil = list(images.values())
    rows = runtime.load(full, backend="onnxruntime").encode(pil)
    reference = _reference(name, ckpt, pil)
    assert len(rows) == len(reference) == len(pil)
    for shape, r, ref in zip(images, rows, reference):
        assert r.embeddings.shape == ref.shape, f"{name}, {shape} image"
        assert float((r.embeddings - ref).abs().max()) <= 1e-5, f"{name}, {shape} image"
        assert r.num_patches == r.num_rows
        assert torch.equal(r.positions, torch.arange(r.num_rows))


def test_apet_rows_positions_and_placeholders(family_engines, images):
    name, _, full, comp = family_engines
    pipe, base = runtime.load(comp, backend="onnxruntime"), runtime.load(full, backend="onnxruntime")
    pil = list(images.values())
    rows, uncompressed = pipe.encode(pil), base.encode(pil)
    image_id = int(pipe.manifest.llm["image_token_id"])
    for shape, r, u in zip(images, rows, uncompressed):
        where = f"{name}, {shape} image"
        assert r.num_patches == u.num_rows, where
        if "image" not in family_class(name).compressed_media:  # passed whole: exactly the uncompressed rows
            assert torch.equal(r.embeddings, u.embeddings) and torch.equal(r.positions, u.positions), where
        else:
            assert 0 < r.num_rows < u.num_rows, where
        assert r.positions.shape == (r.num_rows,) and r.embeddings.shape[0] == r.num_rows, where
        assert bool((r.positions.diff() > 0).all()), where
        assert 0 <= int(r.positions.min()) and int(r.positions.max()) < r.num_patches, where
        a = pipe.assemble("Describe the picture.", [r])
        slots = torch.nonzero(a.input_ids == image_id).flatten()
        assert slots.numel() == r.num_rows and bool((slots.diff() == 1).all()), where
    results = pipe.generate(pil, ["What is it?"] * len(pil), max_new_tokens=2)
    for r, res in zip(rows, results):
        assert res.num_kept == r.num_rows and res.positions == r.positions.tolist()
        assert res.num_patches == r.num_patches
