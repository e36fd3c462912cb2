"""Measuring a model on its device: clock reads after a device synchronisation, peak memory, the device's bf16
peak and MFU. Both benchmarks use these, so their numbers mean the same on a CPU and a GPU."""

from __future__ import annotations

import resource
import time

import torch

# Dense bf16 peak (no sparsity) in TFLOP/s, from the vendors' datasheets, by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def clock(device: torch.device) -> float:
    """Seconds (perf_counter) once every kernel queued on `device` has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, float | str]:
    """Peak memory in GiB: on CUDA the tensors allocated since `reset_peak_memory`; elsewhere the process's peak
    resident set (since it started: weights and everything before included)."""
    if device.type == "cuda":
        return {
            "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "memory": "cuda allocated",
        }
    return {"peak_memory_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3), "memory": "rss"}


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_tflops(device: torch.device, given: float = 0.0) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it came from) of `device`: `given` (> 0) wins; a CUDA device is looked up
    by name in `PEAK_BF16_TFLOPS`; otherwise (None, why)."""
    if given > 0:
        return given, "given"
    if device.type != "cuda":
        return None, f"unknown for {device.type}; pass peak_tflops"
    name = device_name(device)
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"{key} datasheet, dense bf16"
    return None, f"{name} is not in the table; pass peak_tflops"


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: `flops` / `seconds` / (`peak` TFLOP/s); None without a peak."""
    return None if peak is None or seconds <= 0 else round(flops / seconds / (peak * 1e12), 4)
