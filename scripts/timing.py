"""Interleaved timing: every candidate runs once per round, in a rotating order, so that drift of
the machine (thermal, other load) falls on all of them alike. Medians and p90 per candidate.

Clocks: `time.perf_counter` around each call by default (pass `sync=torch.cuda.synchronize` so
the clock stops when the device is done, not when the launch returns); on a GPU, `cuda_events`
times the named candidates (or all, with True) with CUDA events recorded on the current stream
around the call, read after the end event has completed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Collection

from tqdm import tqdm


def summarize(samples: list[float]) -> dict:
    """{"median_s", "p90_s", "min_s", "repeats"} of one candidate's samples (seconds).
    p90 is the nearest-rank value at 0.9 of the sorted samples."""
    if not samples:
        raise ValueError("summarize: no samples")
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_s": statistics.median(ordered), "p90_s": p90, "min_s": ordered[0], "repeats": len(ordered)}


class _CudaEventClock:
    def __init__(self):
        import torch

        self.torch = torch

    def __call__(self, fn: Callable[[], object]) -> float:
        start = self.torch.cuda.Event(enable_timing=True)
        end = self.torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3  # ms -> s


def measure_interleaved(
    candidates: dict[str, Callable[[], object]],
    *,
    repeats: int = 10,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    cuda_events: bool | Collection[str] = False,
    desc: str = "timing",
) -> dict[str, dict]:
    """Run each callable `warmup` times, then `repeats` rounds of all of them interleaved.
    -> {name: summarize(samples)}."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    names = list(candidates)
    evented = set(names) if cuda_events is True else set(cuda_events or ())
    event_clock = _CudaEventClock() if evented else None
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    if sync:
        sync()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(repeats), desc=desc, leave=False):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            if name in evented:
                samples[name].append(event_clock(candidates[name]))
                continue
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

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or None,
        "cpu_model": None,
        "gpu": None,
    }  # every key always present (None when unknown)
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
