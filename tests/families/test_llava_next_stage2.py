"""Paper parity for LLaVA-NeXT: ApET's stage inside the LLM prunes the base crop's rows only (the
official llava_arch.py prunes the base image's span for anyres images), on a tiny LLaVA-NeXT
checkpoint saved with save_pretrained and built by path with --keep 32 --llm-stage 1:16.

- the rows kept after layer 1 equal `apet_ops.compress_reference` (seeds by error rank) on the
  hidden states Transformers' own LlavaNext language model computes for the same prompt and rows,
  restricted to the base crop's 32 rows; the tiles' rows and every newline row stay;
- greedy ids with the KV cache equal the slow reference (tests/helpers/stage2.py) that recomputes
  the whole pruned forward without cache at every step, for images of different row counts;
- what the per-crop engine cannot do (--image-aspect pad) is refused before weights (--start random:
  tests/test_defaults.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.presets import load_preset
from apet_trt.runtime.decoders import Stage2Decoder
from helpers.apet_cases import MARGIN, decision_margin
from helpers.stage2 import Request, embeddings, hidden_after, slow_generate

T, KEEP, LAYER = 32, 16, 1
PROMPTS = ["What is in the picture?", "Describe it in a few words."]
SIZES = [(420, 180), (160, 400), (300, 300)]  # (width, height): wide, tall, square


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Path:
    loaded = load_preset("tiny-llava-next")
    root = tmp_path_factory.mktemp("next_stage2")
    ckpt = root / "checkpoint"
    loaded.model.save_pretrained(str(ckpt))
    loaded.processor.save_pretrained(str(ckpt))
    loaded.tokenizer.save_pretrained(str(ckpt))
    out = root / "engine"
    build(BuildConfig(model=str(ckpt), out=str(out), keep=T, llm_stage=f"{LAYER}:{KEEP}", max_batch=4), quiet=True)
    return out


@pytest.fixture(scope="module")
def pipe(engine):
    return runtime.load(engine, backend="onnxruntime")


def _image(rng: torch.Generator, size) -> Image.Image:
    g = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))
    w, h = size
    return Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _request(pipe, prompt, image):
    [rows] = pipe.encode(image)
    a = pipe.assemble(prompt, [rows])
    return rows, a, Request(a.input_ids, [(a.image_slots, rows.embeddings)], [T], [0])


def test_base_crop_rows_kept_after_layer_1_equal_the_oracle(pipe, rng):
    assert isinstance(pipe.decoder, Stage2Decoder) and pipe.decoder.layer == LAYER
    model = pipe.decoder.model
    stage = ApetConfig(keep=KEEP, seed_placement="error_rank")
    for size in SIZES[:2]:
        for _ in range(10):  # an image whose decisions at layer 1 have clear margins
            image = _image(rng, size)
            rows, a, request = _request(pipe, PROMPTS[0], image)
            hidden = hidden_after(model, embeddings(model, request), LAYER)[0]
            base = hidden[a.image_slots[:T]]
            if decision_margin(base, stage) >= MARGIN:
                break
        else:
            pytest.skip("no well-posed image in 10 draws")
        _, positions = compress_reference(base.unsqueeze(0), stage)
        [result] = pipe.generate(image, PROMPTS[0], max_new_tokens=1)
        assert rows.num_rows > T and result.num_kept == rows.num_rows
        expected = rows.positions[positions[0]].tolist() + rows.positions[T:].tolist()  # tiles, newlines stay
        assert result.llm_positions == expected, size
        assert len(result.llm_positions) == rows.num_rows - (T - KEEP)


def test_greedy_ids_with_cache_equal_the_slow_reference(pipe, rng):
    model = pipe.decoder.model
    config = ApetConfig(keep=KEEP, seed_placement="error_rank")
    images = [_image(rng, s) for s in SIZES]
    for prompt, image in zip(PROMPTS + PROMPTS[:1], images):
        rows, _, request = _request(pipe, prompt, image)
        [result] = pipe.generate(image, prompt, max_new_tokens=6)
        expected = slow_generate(model, request, LAYER, config, 6, pipe.manifest.llm.get("eos_token_id"))
        assert result.ids == expected, f"{rows.num_rows} rows"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(keep=T, image_aspect="pad"), "the llava_next family takes default"),
        (dict(keep=T, llm_stage="1:32"), "KEEP must be below the 32 rows"),
    ],
)
def test_what_the_per_crop_engine_cannot_do_is_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        build(BuildConfig(model="tiny-llava-next", out=str(tmp_path / "e"), **options), quiet=True)
    assert not (tmp_path / "e").exists()
