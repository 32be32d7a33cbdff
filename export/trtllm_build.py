"""TensorRT-LLM decoder engine for the checkpoint's language model, sized for T visual slots.

The documented two-step flow (TensorRT-LLM examples/multimodal/README.md, "LLaVA and VILA"):
  1. convert:  tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face(<llava checkpoint dir>,
               dtype=...) - the LLaMA converter reads a LLaVA checkpoint's text_config and its
               language-model weights - then .save_checkpoint(ckpt_dir, save_config=True);
  2. build:    trtllm-build --checkpoint_dir ckpt --output_dir llm --gemm_plugin auto
               --max_batch_size B --max_input_len L --max_seq_len L+new
               --max_multimodal_len B*T
     (--max_multimodal_len is the prompt-embedding-table capacity: B*T rows, 9x smaller at
     T=64 than at 576.)
The runtime feeds that table as docs/DESIGN.md says (runtime/decoders/prompt_table.py).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = "pip install apet-trt[tensorrt-llm] (needs an NVIDIA GPU)"


def tensorrt_llm_version() -> str | None:
    try:
        import tensorrt_llm

        return tensorrt_llm.__version__
    except ImportError:
        return None


@dataclass
class TrtllmBuildConfig:
    max_batch_size: int
    num_visual_tokens: int  # the most visual rows one request (image) takes: T, or more for multi-crop families
    max_text_len: int = 512  # text tokens of a prompt, T excluded
    max_new_tokens: int = 512
    dtype: str = "float16"
    model_class: str = "LLaMAForCausalLM"  # tensorrt_llm.models class of the language model (the family's)

    @property
    def max_multimodal_len(self) -> int:
        return self.max_batch_size * self.num_visual_tokens

    @property
    def max_input_len(self) -> int:
        return self.max_text_len + self.num_visual_tokens


def build_trtllm(checkpoint_dir: Path, out_dir: Path, config: TrtllmBuildConfig, work_dir: Path) -> dict:
    """Convert and build; returns the manifest's decoder.tensorrt_llm entry (paths relative to
    the engine directory are filled in by the caller)."""
    from tensorrt_llm import models

    ckpt = Path(work_dir) / "trtllm_checkpoint"
    model = getattr(models, config.model_class).from_hugging_face(str(checkpoint_dir), dtype=config.dtype)
    model.save_checkpoint(str(ckpt), save_config=True)
    del model
    exe = shutil.which("trtllm-build")
    if exe is None:
        raise RuntimeError("tensorrt_llm imports but the trtllm-build command is not on PATH")
    cmd = [
        exe,
        "--checkpoint_dir",
        str(ckpt),
        "--output_dir",
        str(out_dir),
        "--gemm_plugin",
        "auto",
        "--max_batch_size",
        str(config.max_batch_size),
        "--max_input_len",
        str(config.max_input_len),
        "--max_seq_len",
        str(config.max_input_len + config.max_new_tokens),
        "--max_multimodal_len",
        str(config.max_multimodal_len),
    ]
    subprocess.run(cmd, check=True)
    shutil.rmtree(ckpt, ignore_errors=True)
    return {
        "max_multimodal_len": config.max_multimodal_len,
        "max_batch_size": config.max_batch_size,
        "max_input_len": config.max_input_len,
        "max_seq_len": config.max_input_len + config.max_new_tokens,
        "dtype": config.dtype,
    }
