"""Video-LLaVA end to end on the real clip (assets/big_buck_bunny.mp4), tiny-video-llava preset:

- with ApET, each frame's 33 rows equal the oracle's video layout (apet_ops.compress_reference,
  layout="video") on that frame's own Transformers features (`get_video_features`), in the official
  order [CLS, 22 by descending error, 10 seeds]; several videos in one call, in engine chunks that
  cut across videos;
- greedy ids equal Transformers `generate` given the same embeddings (a video, a still image);
- still images pass whole through the image tower; the torch backend equals ONNX Runtime;
- the prompt-table decoder's inputs give the inputs_embeds logits for video rows;
- apet run --video --json / --overlay; the language model saved alone equals the VLM's;
- the manifest lists and hashes both engines; a family without videos refuses them.
(The --no-apet rows against `get_video_features`: tests/test_families.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apet_trt import runtime
from apet_trt.apet_ops import ApetConfig, compress_reference
from apet_trt.apet_ops.reference import decide
from apet_trt.export.build import BuildConfig, build
from apet_trt.export.models.video_llava import pixel_values, save_language_model
from apet_trt.runtime.checkpoint import load_transformers_model
from apet_trt.runtime.videos import read_video

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CLIP, PHOTO = ASSETS / "big_buck_bunny.mp4", ASSETS / "grace_hopper.jpg"
CONFIG = ApetConfig(keep=22, basis=10, layout="video")


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("video_llava")
    comp, full = root / "apet", root / "full"
    build(BuildConfig(model="tiny-video-llava", out=str(comp), keep=22, basis=10, max_batch=3), quiet=True)
    build(BuildConfig(model="tiny-video-llava", out=str(full), no_apet=True), quiet=True)
    return comp, full


@pytest.fixture(scope="module")
def hf(engines):
    pipe = runtime.load(engines[0], backend="onnxruntime", decoder="transformers")
    return pipe, pipe.decoder.model


def _frame_features(model, processor, frames) -> torch.Tensor:
    """Transformers' own rows of each frame: [F, 257, H]."""
    with torch.no_grad():
        out = model.model.get_video_features(pixel_values_videos=pixel_values(processor, frames)[None])
    return getattr(out, "pooler_output", out[0] if isinstance(out, tuple) else out).float()


def test_manifest_lists_both_engines(engines):
    m = runtime.load(engines[0], backend="onnxruntime").manifest
    assert m.num_patches == 257 and m.num_visual_tokens == 33 and m.vision["num_frames"] == 8
    assert m.apet["layout"] == "video" and m.data["video_token"] == "<video>"
    assert m.data["parts"]["image"]["engines"]["onnx"] == "image.onnx"
    assert {"vision.onnx", "image.onnx"} <= set(m.data["files"])
    assert m.data["io"]["inputs"][0]["shape"] == ["frames", 3, 224, 224]


def test_apet_rows_per_frame_equal_the_oracle_on_transformers_features(hf):
    pipe, model = hf
    processor = pipe.family.preprocessor.processor
    half = read_video(np.ascontiguousarray(read_video(str(CLIP), 16).frames[::-1]), 8)  # a second, different video
    rows = pipe.encode(videos=[str(CLIP), half])  # 16 frames in engine chunks of 3
    for video, r in zip([read_video(str(CLIP), 8), half], rows):
        features = _frame_features(model, processor, video.frames)
        assert r.num_rows == 8 * 33 and r.num_patches == 8 * 257 and r.media == "video"
        for f in range(8):
            ref_rows, ref_pos = compress_reference(features[f : f + 1], CONFIG)
            got = slice(f * 33, (f + 1) * 33)
            assert (r.positions[got] - f * 257).tolist() == ref_pos[0].tolist(), f"frame {f}"
            torch.testing.assert_close(r.embeddings[got], ref_rows[0], rtol=1e-4, atol=1e-4)
            # the official order, independently: CLS, kept rows by descending error, the FPS seeds
            dec = decide(features[f].double(), CONFIG)
            pos = ref_pos[0].tolist()
            assert pos[0] == 0 and pos[23:] == [s + 1 for s in dec.seeds]
            errors = [float(dec.errors[p - 1]) for p in pos[1:23]]
            assert errors == sorted(errors, reverse=True)
            assert torch.equal(r.embeddings[f * 33], features[f, 0]) or torch.allclose(
                r.embeddings[f * 33], features[f, 0], atol=1e-5
            ), "CLS passes through"


def _hf_ids(model, pipe, prompt, media, rows, new):
    """Transformers generate on the same embeddings: the prompt's media slots filled with `rows`."""
    a = pipe.assemble(prompt, [rows])
    m = pipe.manifest
    with torch.no_grad():
        embeds = model.get_input_embeddings()(a.input_ids[None]).clone()
        embeds[0, a.image_slots] = rows.embeddings
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(a.input_ids[None]),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=m.llm["pad_token_id"],
            eos_token_id=m.llm["eos_token_id"],
        )
    ids = out[0].tolist()
    eos = m.llm["eos_token_id"]
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_greedy_ids_equal_transformers_generate(hf):
    pipe, model = hf
    results = pipe.generate(prompts=["What happens?", "Describe it."], videos=[str(CLIP), str(CLIP)], max_new_tokens=10)
    [video_rows] = pipe.encode(videos=str(CLIP))
    for prompt, res in zip(["What happens?", "Describe it."], results):
        assert res.num_patches == 2056 and res.num_kept == 264
        assert res.ids == _hf_ids(model, pipe, prompt, "video", video_rows, 10)
    [res] = pipe.generate(str(PHOTO), "What is it?", max_new_tokens=10)
    [image_rows] = pipe.encode(str(PHOTO))
    assert res.num_patches == res.num_kept == 256
    assert res.ids == _hf_ids(model, pipe, "What is it?", "image", image_rows, 10)


def test_still_images_pass_whole_and_equal_get_image_features(hf, engines):
    pipe, model = hf
    g = np.random.default_rng(0)
    pil = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in ((300, 200), (150, 330))]
    rows = pipe.encode(pil)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values(pipe.family.preprocessor.processor, pil))
    ref = getattr(ref, "pooler_output", ref)
    for r, x in zip(rows, ref):
        assert r.media == "image" and r.num_rows == r.num_patches == 256
        assert float((r.embeddings - x).abs().max()) <= 1e-5


def test_a_prompt_with_an_image_and_a_video(hf):
    pipe, _ = hf
    [res] = pipe.generate(str(PHOTO), "USER: <video>\nand <image>? ASSISTANT:", videos=str(CLIP), max_new_tokens=2)
    assert res.num_patches == 2056 + 256 and res.num_kept == 264 + 256
    [image_rows, video_rows] = pipe.encode(str(PHOTO), videos=str(CLIP))
    assert res.positions == video_rows.positions.tolist() + (image_rows.positions + 2056).tolist()  # slot order


def test_torch_backend_equals_onnxruntime(engines):
    ort = runtime.load(engines[0], backend="onnxruntime")
    eager = runtime.load(engines[0], backend="torch")
    for a, b in zip(ort.encode(str(PHOTO), videos=str(CLIP)), eager.encode(str(PHOTO), videos=str(CLIP))):
        assert torch.equal(a.positions, b.positions)
        torch.testing.assert_close(a.embeddings, b.embeddings, rtol=1e-4, atol=1e-4)


def test_prompt_table_inputs_give_the_inputs_embeds_logits(hf):
    """The TensorRT-LLM prompt-table route with video rows (the table lookup emulated)."""
    from apet_trt.runtime.decoders.prompt_table import build_prompt_table_inputs

    pipe, model = hf
    [rows] = pipe.encode(videos=str(CLIP))
    a = pipe.assemble("What happens?", [rows])
    vocab = model.config.text_config.vocab_size
    t = build_prompt_table_inputs(
        [a.input_ids], [a.image_slots], [rows.embeddings], vocab_size=vocab, dtype=torch.float32
    )
    ids = t.batch_input_ids[0].to(torch.int64)
    virtual = ids >= vocab
    table = t.prompt_table.reshape(-1, t.prompt_table.shape[-1])
    looked_up = torch.where(
        virtual[:, None],
        table[torch.where(virtual, ids - vocab, 0)],
        model.get_input_embeddings()(torch.where(virtual, 0, ids)),
    )
    embeds = model.get_input_embeddings()(a.input_ids).clone()
    embeds[a.image_slots] = rows.embeddings
    with torch.no_grad():
        want = model(inputs_embeds=embeds[None]).logits
        got = model(inputs_embeds=looked_up[None]).logits
    assert torch.equal(want, got)


def test_cli_video_json_and_contact_sheet(engines, tmp_path, capsys):
    from apet_trt.scripts.cli import main

    sheet = tmp_path / "sheet.png"
    args = ["run", "--engine", str(engines[0]), "--video", str(CLIP), "--prompt", "What happens?"]
    assert main([*args, "--max-new-tokens", "2", "--json", "--overlay", str(sheet)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_patches"] == 2056 and out["num_kept"] == 264 and len(out["positions"]) == 264
    with Image.open(sheet) as im:  # 8 frames of 224 px at scale 2, 4 a row, 8 px gaps
        assert im.size == (4 * 448 + 3 * 8, 2 * 448 + 8)


def test_cli_gives_one_line_for_a_bad_video(engines, tmp_path, capsys):
    from apet_trt.scripts.cli import main

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"")
    assert main(["run", "--engine", str(engines[0]), "--video", str(bad), "--prompt", "x"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("apet run: error: ValueError: --video:") and "empty file (0 bytes)" in last  # before loading


def test_language_model_alone_equals_the_vlm_s(engines, tmp_path):
    from transformers import LlamaForCausalLM

    m = runtime.load(engines[0], backend="onnxruntime").manifest
    vlm = load_transformers_model(m, device=torch.device("cpu"), model_class="VideoLlavaForConditionalGeneration")
    out = save_language_model(m.path_of("hf"), tmp_path / "lm")
    lm = LlamaForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        assert torch.equal(vlm(input_ids=ids).logits, lm(input_ids=ids).logits)


def test_a_family_without_videos_refuses_them(tmp_path):
    from helpers.engines import build_engine_dir

    pipe = runtime.load(build_engine_dir(tmp_path / "llava"), backend="onnxruntime")
    with pytest.raises(ValueError, match="this model takes no videos"):
        pipe.generate(prompts="x", videos=str(CLIP))
    with pytest.raises(ValueError, match="the llava family takes no videos"):
        pipe.encode(videos=str(CLIP))


def test_serve_upstream_route_is_prompt_embeds_to_vllm_only(engines):
    """vLLM registers no Video-LLaVA: apet serve --upstream takes the prompt-embeds route to vLLM (tested
    against a real vLLM in tests/upstream/) and refuses trtllm-serve's format in one line."""
    pytest.importorskip("fastapi", reason="apet serve needs the [serve] extra")
    from apet_trt.runtime.serve.app import load_pipeline
    from apet_trt.runtime.serve.config import ServeConfig

    cfg = ServeConfig(engine=str(engines[0]), upstream="http://127.0.0.1:9", backend="onnxruntime")
    assert load_pipeline(cfg).family.upstream_route("vllm") == "prompt_embeds"
    with pytest.raises(ValueError, match="only as prompt embeddings to vLLM's /v1/completions"):
        load_pipeline(ServeConfig(**{**cfg.__dict__, "upstream_format": "trtllm"}))
