"""What a benchmark run records about the machine and the software it ran on."""

from __future__ import annotations

import os
import platform
import time
from typing import Any

import numpy as np

import optirs

from .cases import BenchConfig


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def mem_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str | None:
    """The CPU model name from /proc/cpuinfo, where present."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "cpu model")) and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, where the OS reports them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def collect(torch: Any, config: BenchConfig) -> dict[str, Any]:
    """Versions, machine and settings of this run."""
    try:
        import matplotlib

        mpl_version: str | None = matplotlib.__version__
    except ImportError:
        mpl_version = None
    return {
        "optirs_version": optirs.__version__,
        "simd_level": optirs.simd_level(),
        "chunk_elems": optirs._core.CHUNK_ELEMS,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "matplotlib_version": mpl_version,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpus_available": available_cpus(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_available_bytes": mem_available(),
        "load_average_at_start": load_average(),
        "threads": config.threads,
        "dtypes": [d.name for d in config.dtypes],
        "apis": config.apis,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "sample_s": config.sample_s,
        "settle_s": config.settle_s,
        "seed": config.seed,
        "ceiling": "optirs._core.traffic: 1 read-only stream (gradient) and 1 read-write stream "
        "per parameter/state buffer, same pool, chunking and SIMD dispatch as a step; per "
        "round the faster of one call per tensor and one call over all tensors",
        "train_models": [m.name for m in config.train_models],
        "train_optimizers": [c.name for c in config.train_cases],
        "train_sample_s": config.train_sample_s,
        "argv": config.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
