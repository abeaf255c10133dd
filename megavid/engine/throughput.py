"""Throughput and MFU: samples/s, tokens/s, TFLOP/s per device and model FLOPs utilisation.

MFU = achieved model FLOP/s (the task's analytic fwd+bwd FLOPs per sample x samples/s per
device) / the device's dense peak for the training dtype. Peaks are datasheet dense (no
sparsity) tensor-core numbers; on CPU no MFU is reported (there is no meaningful peak).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# Dense peak TFLOP/s per device name fragment: {dtype: TFLOP/s}. Matched case-insensitively,
# most specific first (the first matching fragment wins).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.5}),
    ("gh200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.5}),
    ("h100 pcie", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0, "tf32": 378.0}),
    ("h100 nvl", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0, "tf32": 417.5}),
    ("h100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.5}),  # SXM
    ("h800", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0, "tf32": 494.5}),
    ("b200", {"bf16": 2250.0, "fp16": 2250.0, "fp32": 80.0, "tf32": 1100.0}),
    ("a100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0}),
    ("a800", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tf32": 156.0}),
    ("l40s", {"bf16": 362.05, "fp16": 362.05, "fp32": 91.6, "tf32": 183.0}),
    ("l40", {"bf16": 181.0, "fp16": 181.0, "fp32": 90.5, "tf32": 90.5}),
    ("a6000", {"bf16": 154.8, "fp16": 154.8, "fp32": 38.7, "tf32": 77.4}),
    ("a10", {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2, "tf32": 62.5}),
    ("v100", {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7, "tf32": 0.0}),
    ("t4", {"bf16": 0.0, "fp16": 65.0, "fp32": 8.1, "tf32": 0.0}),
]


def get_peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a device for 'bf16' | 'fp16' | 'fp32', or None when unknown.

    Args:
        device_name: e.g. ``torch.cuda.get_device_name()`` ("NVIDIA H100 80GB HBM3").
        precision: the training precision.
    """
    name = device_name.lower()
    if "pcie" in name and "h100" in name:
        name = name.replace("pcie", " pcie").replace("  ", " ")
    for frag, peaks in PEAK_TFLOPS:
        if frag in name:
            peak = peaks.get(precision)
            return peak or None
    return None


def get_device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def compute_mfu(flops_per_sample: float, samples_per_s_per_device: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a known peak).

    Args:
        flops_per_sample: analytic training FLOPs (fwd+bwd) of one sample.
        samples_per_s_per_device: throughput of one device.
        peak_tflops: the device's dense peak (TFLOP/s).
    """
    if not peak_tflops or flops_per_sample <= 0:
        return None
    return flops_per_sample * samples_per_s_per_device / (peak_tflops * 1e12)


@dataclass
class ThroughputMeter:
    """Accumulates samples, step time and data-wait time between log points (per rank)."""

    world_size: int = 1
    flops_per_sample: float = 0.0
    peak_tflops: float | None = None
    _samples: int = 0
    _tokens: float | None = None
    _data_s: float = 0.0
    _steps: int = 0
    _t0: float = field(default_factory=time.perf_counter)

    def add(self, samples: int, data_wait_s: float, tokens: float | None = None) -> None:
        """Record one optimizer step's local samples, tokens and time spent waiting for data.

        Args:
            samples: samples this rank consumed in the step (all micro-batches).
            data_wait_s: seconds spent waiting for the loader.
            tokens: tokens in those samples (video patches x frames + text); None when the
                task does not count tokens (then no tokens/s is reported).
        """
        self._samples += samples
        if tokens is not None:
            self._tokens = (self._tokens or 0.0) + tokens
        self._data_s += data_wait_s
        self._steps += 1

    def reset(self) -> None:
        self._samples, self._data_s, self._steps, self._tokens = 0, 0.0, 0, None
        self._t0 = time.perf_counter()

    def summary(self) -> dict[str, float]:
        """Metrics since the last reset; samples/s and tokens/s are global (all ranks, assuming
        ranks run at the same pace, as they do in lockstep), ``*_per_device`` the rest per device."""
        dt = max(time.perf_counter() - self._t0, 1e-9)
        per_dev = self._samples / dt
        out = {
            "samples_per_s": per_dev * self.world_size,
            "samples_per_s_per_device": per_dev,
            "step_time_s": dt / max(self._steps, 1),
            "data_wait_pct": 100.0 * self._data_s / dt,
        }
        if self._tokens is not None:
            out["tokens_per_s"] = self._tokens / dt * self.world_size
            out["tokens_per_s_per_device"] = self._tokens / dt
        if self.flops_per_sample > 0:
            out["tflops_per_device"] = self.flops_per_sample * per_dev / 1e12
            mfu = compute_mfu(self.flops_per_sample, per_dev, self.peak_tflops)
            if mfu is not None:
                out["mfu"] = mfu
        return out
