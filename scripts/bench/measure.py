"""Measuring, the benchmark's two clocks and its memory sampler.

Interleaved timing: every candidate runs once per round, in a rotating order, so that drift of the
machine (thermal, other load) falls on all of them alike; medians and p90 per candidate. Clocks:
`time.perf_counter` around each call by default (pass `sync=torch.cuda.synchronize` so the clock
stops when the device is done, not when the launch returns); on a GPU, `cuda_events` times the named
candidates (or all, with True) with CUDA events recorded on the current stream around the call.
`measure_stages` is for callables that time their own stages (the runtime's decoder and pipeline
report prefill, decode, vision ... per call): it keeps what the timed calls reported.

Memory, per call and untimed (the sampling thread would disturb the timings): the peak RSS of this
process while the call runs over what it held just before, and the CUDA allocator's peak on a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Collection

from tqdm import tqdm

# -- timing -------------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict:
    """{"median_s", "p90_s", "min_s", "repeats"} of one candidate's samples (seconds).
    p90 is the nearest-rank value at 0.9 of the sorted samples."""
    if not samples:
        raise ValueError("summarize: no samples")
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median_s": statistics.median(ordered), "p90_s": p90, "min_s": ordered[0], "repeats": len(ordered)}


def ratio(num: dict | None, den: dict | None) -> float | None:
    """Median over median of two summaries; None when either is missing."""
    if not num or not den:
        return None
    return num["median_s"] / den["median_s"]


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


def measure_stages(
    candidates: dict[object, Callable[[], dict[str, float]]],
    *,
    repeats: int,
    warmup: int,
    sync: Callable[[], None] | None = None,
    desc: str = "timing",
) -> dict[object, dict[str, dict]]:
    """measure_interleaved for callables that time their own stages: each returns {stage: seconds}.
    -> {name: {"call": the whole call's summary, stage: the summary of what the timed calls reported}}."""
    reported: dict[object, list[dict[str, float]]] = {name: [] for name in candidates}

    def recording(name, fn):
        return lambda: reported[name].append(fn())

    calls = measure_interleaved(
        {name: recording(name, fn) for name, fn in candidates.items()},
        repeats=repeats,
        warmup=warmup,
        sync=sync,
        desc=desc,
    )
    out = {}
    for name, runs in reported.items():
        timed = runs[warmup:]  # each candidate ran its warm-up calls first
        out[name] = {"call": calls[name], **{stage: summarize([r[stage] for r in timed]) for stage in timed[0]}}
    return out


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


# -- memory -------------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # glibc only: give freed heap pages back so RSS starts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Memory:
    """Per-call memory: the peak RSS of this process while `fn` runs (a thread samples it every
    `interval` seconds), over what the process held just before; the CUDA allocator's peak on a GPU."""

    def __init__(self, cuda: bool, interval: float = 0.002):
        self.cuda, self.interval = cuda, interval
        self.cuda_peak = 0  # the largest CUDA peak of any measured call

    def measure(self, fn, cuda: bool | None = None) -> dict:
        """cuda: whether fn uses the GPU (default: whether this process has one)."""
        import torch

        cuda = self.cuda if cuda is None else (cuda and self.cuda)
        _trim_heap()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before = _rss()
        peak = [before]
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _rss())
                stop.wait(self.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            fn()
            if cuda:
                torch.cuda.synchronize()
        finally:
            stop.set()
            thread.join()
        peak_rss = max(peak[0], _rss())
        cuda_peak = int(torch.cuda.max_memory_allocated()) if cuda else None
        if cuda_peak is not None:
            self.cuda_peak = max(self.cuda_peak, cuda_peak)
        return {
            "rss_before_bytes": before,
            "rss_peak_bytes": peak_rss,
            "rss_delta_bytes": peak_rss - before,
            "cuda_peak_allocated_bytes": cuda_peak,
        }


def process_peak_rss() -> int:
    """ru_maxrss: the high-water mark of this process's RSS (kilobytes on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(value if sys.platform == "darwin" else value * 1024)
