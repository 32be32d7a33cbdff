"""Which decoder runs an engine directory, as runtime/backends/ chooses the vision backend:
`choose_decoder` -> Choice(name, reason, fallback); `create_decoder` imports and builds it.

    auto              the directory's TensorRT-LLM engine (where tensorrt_llm imports and the plan was
                      built for this machine); else TensorRT-LLM's LLM API for a family it takes
                      precomputed rows for (weights saved); else Transformers. An engine built with
                      ApET inside the LLM (llm_stage) runs in Transformers only.
    transformers | tensorrt_llm | tensorrt_llm_api   that one (refused with the reason when it cannot run)
"""

from __future__ import annotations

from apet_trt.apet_ops.probes import tensorrt_llm_available

from ..checkpoint import dtype_named, llm_dtype
from ..choice import DECODERS, Choice
from ..manifest import Manifest
from ..plans import plan_mismatch, this_machine


def choose_decoder(manifest: Manifest, requested: str, family) -> Choice:
    """The decoder and why (`family`: the runtime adapter, runtime/families/)."""
    if requested not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {requested!r}")
    if requested != "auto":
        return Choice(requested, "requested")
    if manifest.llm_stage:
        return Choice("transformers", "auto: ApET inside the LLM (llm_stage) runs in the Transformers decoder only")
    decoders, fell_back = manifest.decoders, None
    if decoders.tensorrt_llm is not None:
        ok, why = tensorrt_llm_available()
        if ok and (why := plan_mismatch(manifest, "tensorrt_llm", this_machine())) is None:
            return Choice("tensorrt_llm", "auto: the engine directory's TensorRT-LLM engine, tensorrt_llm present")
        fell_back = f"auto: fell back from the directory's TensorRT-LLM engine because {why}"
    if family.tensorrt_llm_api and decoders.transformers is not None and decoders.transformers.weights == "saved":
        ok, why = tensorrt_llm_available()
        if ok:
            return Choice("tensorrt_llm_api", fell_back or "auto: TensorRT-LLM's LLM API", fallback=bool(fell_back))
        return Choice("transformers", fell_back or f"auto: TensorRT-LLM's LLM API not used ({why})", bool(fell_back))
    return Choice("transformers", fell_back or "auto: Transformers", fallback=bool(fell_back))


def create_decoder(name: str, manifest: Manifest, family, model_loader):
    """The decoder `name` ("transformers" | "tensorrt_llm" | "tensorrt_llm_api") for the engine
    directory; `model_loader()` gives the Transformers model (shared with the torch backend)."""
    llm = manifest.llm
    common = dict(
        image_token_id=llm["image_token_id"],
        pad_token_id=llm.get("pad_token_id"),
        eos_token_id=llm.get("eos_token_id"),
        max_length=int(llm["max_position_embeddings"]),
    )
    if name == "transformers" and manifest.llm_stage:
        from .stage2 import stage2_decoder

        return stage2_decoder(model_loader(), manifest, family, **common)
    if name == "transformers":
        return family.transformers_decoder(model_loader(), **common)  # the family's (Qwen3-VL: DeepStack)
    if name not in DECODERS[1:]:
        raise ValueError(f"decoder must be one of {DECODERS[1:]} here, got {name!r}")
    if manifest.llm_stage:
        raise RuntimeError(llm_stage_refusal(manifest, name))
    if name == "tensorrt_llm":
        return _engine_flow(manifest, family)
    return _llm_api(manifest, family)


def _engine_flow(manifest: Manifest, family):
    from .tensorrt_llm import TensorRTLLMDecoder

    entry, llm = manifest.decoders.tensorrt_llm, manifest.llm
    if entry is None:
        raise RuntimeError(
            f"{manifest.root}: decoder='tensorrt_llm' but the engine directory has no TensorRT-LLM "
            "engine (decoder.tensorrt_llm is null); build it with tensorrt_llm installed"
        )
    if (mismatch := plan_mismatch(manifest, "tensorrt_llm", this_machine())) is not None:
        raise RuntimeError(mismatch)
    pad = llm.get("pad_token_id")
    return TensorRTLLMDecoder(
        manifest.tensorrt_llm_dir(),
        vocab_size=int(llm["vocab_size"]),
        max_rows=family.fixed_rows,
        eos_token_id=int(llm["eos_token_id"]),
        pad_token_id=int(pad if pad is not None else llm["eos_token_id"]),
        # the engine's dtype is the prompt table's
        dtype=dtype_named(entry.dtype, f"{manifest.root}: decoder.tensorrt_llm.dtype"),
    )


def _llm_api(manifest: Manifest, family):
    from .tensorrt_llm import TensorRTLLMAPIDecoder

    if not family.tensorrt_llm_api:
        raise RuntimeError(
            f"decoder='tensorrt_llm_api': TensorRT-LLM's LLM API takes no precomputed rows for the "
            f"{family.name} family (its input processor has no attach_multimodal_embeddings); use "
            "'tensorrt_llm' (the engine flow) or 'transformers'"
        )
    hf, llm = manifest.decoders.transformers, manifest.llm
    if hf is None or hf.weights != "saved":
        raise RuntimeError(
            f"{manifest.root}: decoder='tensorrt_llm_api' loads the checkpoint's weights, but the manifest's "
            f"decoder weights are {hf and hf.weights!r}; build from a checkpoint or a preset saved whole"
        )
    return TensorRTLLMAPIDecoder(
        manifest.transformers_checkpoint(),
        image_token=manifest.image_token,
        max_length=int(llm["max_position_embeddings"]),
        dtype=llm_dtype(manifest),
        eos_token_id=llm.get("eos_token_id"),
        pad_token_id=llm.get("pad_token_id"),
    )


def llm_stage_refusal(manifest: Manifest, decoder: str) -> str:
    """The one line for a decoder that cannot run an engine's ApET stage inside the LLM."""
    stage = manifest.llm_stage
    return (
        f"{manifest.root}: built with --llm-stage {stage.get('layer')}:{stage.get('keep')} (ApET inside the LLM), "
        f"which the {decoder} decoder cannot run; use decoder='transformers', or build without --llm-stage/--budget"
    )
