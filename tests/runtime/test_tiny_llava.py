"""The default preset end to end, on engine directories built by `apet build` (export/), so the
runtime is checked against the real writer of the format."""

import pytest
import torch

from apet_trt import runtime
from apet_trt.runtime.checkpoint import load_transformers_model
from apet_trt.runtime.manifest import load_manifest
from apet_trt.scripts.cli import build_parser, main
from helpers.engines import stack_rows

PHOTO = "assets/grace_hopper.jpg"


def _build_options() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {opt for action in sub.choices["build"]._actions for opt in action.option_strings}


def _out_flag() -> str:
    options = _build_options()
    for flag in ("--out", "--output", "--engine-dir", "--engine", "-o"):
        if flag in options:
            return flag
    raise AssertionError(f"apet build has no output-directory option among {sorted(options)}")


def _build(path, *extra) -> str:
    rc = main(["build", "--model", "tiny-llava", *extra, _out_flag(), str(path)])
    assert rc == 0, "apet build failed"
    return str(path)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("tiny") / "tiny-llava-t64", "--keep", "64", "--basis", "10")


def _hf_ids(model, tokenizer, manifest, prompt, embeddings, new):
    t = manifest.num_visual_tokens
    text = manifest.prompt_template.format(prompt=prompt).replace(manifest.image_token, manifest.image_token * t)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == manifest.llm["image_token_id"]] = embeddings.reshape(-1, embeddings.shape[-1]).to(embeds.dtype)
        out = model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=manifest.llm["pad_token_id"],
            eos_token_id=manifest.llm["eos_token_id"],
        )
    ids = out[0].tolist()
    eos = manifest.llm["eos_token_id"]
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def test_tiny_llava_greedy_ids_equal_transformers_generate(engine):
    pipe = runtime.load(engine, backend="onnxruntime", decoder="transformers")
    manifest = load_manifest(engine)
    assert manifest.num_visual_tokens == 64 and manifest.num_patches == 576
    [r] = pipe.generate(PHOTO, "What is in the picture?", max_new_tokens=12)
    assert r.num_patches == 576 and r.num_kept == 64 and len(r.positions) == 64
    embeddings, positions = stack_rows(pipe.encode(PHOTO))
    assert r.positions == positions[0].tolist()
    model = load_transformers_model(manifest, device=torch.device("cpu"), model_class="LlavaForConditionalGeneration")
    assert r.ids == _hf_ids(model, pipe.tokenizer, manifest, "What is in the picture?", embeddings, 12)


def test_tiny_llava_backends_and_runs_keep_the_same_positions(engine):
    manifest = load_manifest(engine)
    if manifest.data["decoder"]["transformers"].get("weights") != "saved":
        pytest.skip("the preset's weights are not saved: the torch backend refuses it (tested elsewhere)")
    ort = runtime.load(engine, backend="onnxruntime")
    pt = runtime.load(engine, backend="torch")
    _, p_ort = stack_rows(ort.encode(PHOTO))
    _, p_pt = stack_rows(pt.encode(PHOTO))
    _, p_again = stack_rows(ort.encode(PHOTO))
    assert torch.equal(p_ort, p_pt) and torch.equal(p_ort, p_again)
