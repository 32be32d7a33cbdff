"""Interleaved timing: every candidate runs once per round, in a rotating order, so that drift of
the machine (thermal, other load) falls on all of them alike. Medians and p90 per candidate.

On a GPU, pass `sync=torch.cuda.synchronize` (or use CUDA events around the callable) so the
clock stops when the device is done, not when the launch returns.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from tqdm import tqdm


def summarize(samples: list[float]) -> dict:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_s": statistics.median(ordered), "p90_s": p90, "min_s": ordered[0],
            "repeats": len(ordered)}


def measure_interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    desc: str = "timing",
) -> dict[str, dict]:
    """Run each callable `warmup` times, then `repeats` rounds of all of them interleaved."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    if sync:
        sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            if sync:
                sync()
            samples[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in samples.items()}


def machine_info() -> dict:
    import os
    import platform

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "processor": platform.processor() or None}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
