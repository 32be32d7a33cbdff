"""runtime.load + pipeline.generate on a small LLaVA engine directory (tests/helpers/engines.py):
greedy ids against Transformers' own generate, backends against each other, threads against
serial calls, and the request-level errors."""

import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from matplotlib import cbook
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from apet_trt import runtime
from helpers.engines import IMAGE_SIZE, TEMPLATE, N, build_engine_dir, stack_rows, write_manifest

PHOTO = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
KEEP = 12


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_engine_dir(tmp_path_factory.mktemp("eng") / "t12", keep=KEEP)


@pytest.fixture(scope="module")
def pipe(engine):
    return runtime.load(engine, backend="onnxruntime")


@pytest.fixture(scope="module")
def hf(engine):
    return LlavaForConditionalGeneration.from_pretrained(str(engine / "hf")).eval()


def _image(rng) -> np.ndarray:
    return torch.randint(0, 256, (IMAGE_SIZE + 10, IMAGE_SIZE, 3), generator=rng, dtype=torch.uint8).numpy()


def _trim(ids, eos):
    ids = list(ids)
    return ids[: ids.index(eos) + 1] if eos in ids else ids


def _hf_generate_from_embeddings(hf, tokenizer, prompts, embeddings, t, new):
    """Transformers' own generate, given the compressed embeddings at the image-token positions
    (left-padded batch, as generate expects for decoder-only models)."""
    cfg = hf.config
    rows = [tokenizer(TEMPLATE.format(prompt=p).replace("<image>", "<image>" * t))["input_ids"] for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = torch.tensor(r)
        mask[b, length - len(r) :] = 1
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        for b in range(len(rows)):
            embeds[b, ids[b] == cfg.image_token_id] = embeddings[b]
        out = hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return [_trim(o.tolist(), tokenizer.eos_token_id) for o in out]


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_ids_equal_transformers_generate(pipe, hf, rng, batch):
    images = [PHOTO] + [_image(rng) for _ in range(batch - 1)]
    prompts = ["What is in the picture?", "Describe it in three words, then more."][:batch]
    results = pipe.generate(images, prompts, max_new_tokens=10)
    embeddings, positions = stack_rows(pipe.encode(images))
    expected = _hf_generate_from_embeddings(hf, pipe.tokenizer, prompts, embeddings, KEEP, 10)
    for b, r in enumerate(results):
        assert r.ids == expected[b]
        assert r.positions == positions[b].tolist()
        assert r.text == pipe.tokenizer.decode(r.ids, skip_special_tokens=True)
        assert r.num_patches == N and r.num_kept == KEEP
        assert set(r.timings) >= {"preprocess_ms", "vision_ms", "first_token_ms", "decode_ms", "total_ms"}


def test_no_compression_equals_plain_generate(tmp_path, rng):
    from transformers import AutoImageProcessor, LlavaProcessor

    root = build_engine_dir(tmp_path / "full", keep=None, max_position_embeddings=160)
    p = runtime.load(root, backend="onnxruntime")
    assert p.num_visual_tokens == N
    hf = LlavaForConditionalGeneration.from_pretrained(str(root / "hf")).eval()
    processor = LlavaProcessor(
        image_processor=AutoImageProcessor.from_pretrained(str(root / "processor"), backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(str(root / "tokenizer")),
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    image = _image(rng)
    prompt = "Where is the cat?"
    inputs = processor(images=image, text=TEMPLATE.format(prompt=prompt), return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == p.assembler(prompt, N).input_ids.tolist()
    with torch.no_grad():
        inputs.pop("token_type_ids", None)  # Transformers 4.x tokenizers add it; generate refuses it
        out = hf.generate(
            **inputs,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=p.tokenizer.pad_token_id,
            eos_token_id=p.tokenizer.eos_token_id,
        )
    expected = _trim(out[0, inputs["input_ids"].shape[1] :].tolist(), p.tokenizer.eos_token_id)
    [r] = p.generate(image, prompt, max_new_tokens=8)
    assert r.ids == expected
    assert r.positions == list(range(N))


def test_backends_keep_the_same_positions(engine, pipe, rng):
    torch_pipe = runtime.load(engine, backend="torch")
    assert torch_pipe.backend == "torch"
    images = [PHOTO, _image(rng), _image(rng)]
    e_ort, p_ort = stack_rows(pipe.encode(images))
    e_pt, p_pt = stack_rows(torch_pipe.encode(images))
    assert torch.equal(p_ort, p_pt)
    torch.testing.assert_close(e_ort, e_pt, rtol=1e-4, atol=1e-4)
    e_again, p_again = stack_rows(pipe.encode(images))  # same input, same positions across runs
    assert torch.equal(p_again, p_ort) and torch.equal(e_again, e_ort)
    assert bool((p_ort.diff(dim=1) > 0).all())  # ascending


def test_threads_give_serial_results(pipe, rng):
    images = [_image(rng) for _ in range(8)]
    prompts = [f"Question number {i}?" for i in range(8)]
    serial = [pipe.generate(img, q, max_new_tokens=4)[0] for img, q in zip(images, prompts)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda a: pipe.generate(a[0], a[1], max_new_tokens=4)[0], zip(images, prompts)))
    assert [(r.ids, r.positions) for r in threaded] == [(r.ids, r.positions) for r in serial]


def test_sampling_is_reproducible_with_a_seed(pipe):
    a = pipe.generate(PHOTO, "Tell a story.", max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, seed=7)
    b = pipe.generate(PHOTO, "Tell a story.", max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, seed=7)
    assert a[0].ids == b[0].ids


def test_request_errors(pipe, rng):
    with pytest.raises(ValueError, match="2 image\\(s\\) but 1 prompt"):
        pipe.generate([PHOTO, PHOTO], ["one prompt"])
    with pytest.raises(ValueError, match="1 image\\(s\\) but 2 prompt"):
        pipe.generate([PHOTO], ["a", "b"])
    with pytest.raises(ValueError, match="empty batch"):
        pipe.generate([], [])
    with pytest.raises(ValueError, match="exceeds the transformers decoder's maximum length 160"):
        pipe.generate(PHOTO, "x" * 200, max_new_tokens=4)
    with pytest.raises(ValueError, match="2 image slots"):
        pipe.generate(PHOTO, "USER: <image><image> compare ASSISTANT:")
    with pytest.raises(ValueError, match="max_new_tokens"):
        pipe.generate(PHOTO, "hi", max_new_tokens=0)


def test_tensorrt_backend_without_tensorrt_names_the_extra(engine):
    from apet_trt.runtime.backends import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present here")
    with pytest.raises(RuntimeError, match=r"pip install apet-trt\[tensorrt\]"):
        runtime.load(engine, backend="tensorrt")


def test_auto_falls_back_and_says_so(tmp_path, caplog):
    import json
    import shutil

    from apet_trt.runtime.backends import tensorrt_available

    if tensorrt_available()[0]:
        pytest.skip("TensorRT and a GPU are present here: auto would take the plan")
    root = build_engine_dir(tmp_path / "with_plan", keep=KEEP)
    (root / "vision.plan").write_bytes(b"not a real plan: auto must not open it without TensorRT")
    data = json.loads((root / "manifest.json").read_text())
    data["engines"]["tensorrt"] = "vision.plan"
    write_manifest(root, data)
    with caplog.at_level(logging.WARNING, logger="apet.runtime"):
        p = runtime.load(root)  # backend="auto"
    assert p.backend == "onnxruntime"
    assert "fell back from TensorRT" in p.backend_reason
    assert any("fell back from TensorRT" in rec.getMessage() for rec in caplog.records)
    shutil.rmtree(root)


def test_auto_decoder_falls_back_from_a_tensorrt_llm_engine_and_says_so(tmp_path, caplog):
    """A directory with a TensorRT-LLM engine, on a machine where tensorrt_llm does not import: auto
    takes Transformers, says why at WARNING (the fallback flag, not the wording, sets the level),
    and an explicit decoder='transformers' is logged at INFO only."""
    import json

    from apet_trt.apet_ops.probes import tensorrt_llm_available

    if tensorrt_llm_available()[0]:
        pytest.skip("tensorrt_llm imports here: auto would take the engine")
    root = build_engine_dir(tmp_path / "with_llm", keep=KEEP)
    (root / "llm").mkdir()
    (root / "llm" / "rank0.engine").write_bytes(b"not a real engine: auto must not open it")
    data = json.loads((root / "manifest.json").read_text())
    data["decoder"]["tensorrt_llm"] = {
        "engine_dir": "llm",
        "max_multimodal_len": KEEP,
        "max_batch_size": 1,
        "max_input_len": 64,
        "max_seq_len": 96,
        "dtype": "float32",
    }
    write_manifest(root, data)
    with caplog.at_level(logging.INFO, logger="apet.runtime"):
        p = runtime.load(root, backend="onnxruntime")
    assert p.decoder.name == "transformers"
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "decoder transformers (auto: fell back from the directory's TensorRT-LLM engine because" in warning.getMessage()
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="apet.runtime"):
        runtime.load(root, backend="onnxruntime", decoder="transformers")
    assert [r.levelno for r in caplog.records if "decoder" in r.getMessage()] == [logging.INFO]


def test_a_preprocessed_batch_and_a_sampling_config_give_what_the_keywords_give(pipe, rng):
    """apet run's path: preprocess once (the grid and the overlay draw from the same batch), pass the
    batch and a SamplingConfig; the result equals generate() from the file with the keywords."""
    from apet_trt.runtime.decoders import SamplingConfig

    images = [PHOTO, _image(rng)]
    prompts = ["What is it?", "And this?"]
    plain = pipe.generate(images, prompts, max_new_tokens=4, do_sample=True, top_k=5, seed=3)
    batch = pipe.preprocess(images)
    assert batch.preprocess_ms > 0
    sampling = SamplingConfig(max_new_tokens=4, do_sample=True, top_k=5, seed=3)
    given = pipe.generate(images, prompts, sampling=sampling, batch=batch)
    assert [(r.ids, r.positions, r.text) for r in given] == [(r.ids, r.positions, r.text) for r in plain]
    assert given[0].timings["preprocess_ms"] == pytest.approx(batch.preprocess_ms)
    with pytest.raises(ValueError, match="not both"):
        pipe.generate(images, prompts, sampling=sampling, max_new_tokens=8)
    with pytest.raises(ValueError, match="batch holds 2 item"):
        pipe.generate(PHOTO, "What is it?", batch=batch)
