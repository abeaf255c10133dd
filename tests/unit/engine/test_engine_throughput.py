"""Peak table and MFU arithmetic."""

import pytest

from megavid.engine.throughput import ThroughputMeter, compute_mfu, get_peak_tflops


@pytest.mark.parametrize("name, prec, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA L40S", "fp16", 362.05),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
])
def test_peak_table(name, prec, peak):
    assert get_peak_tflops(name, prec) == peak


def test_unknown_device_and_cpu_have_no_peak():
    assert get_peak_tflops("cpu", "bf16") is None
    assert get_peak_tflops("Some Future GPU", "bf16") is None
    assert get_peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores


def test_mfu_hand_computed():
    # 1 TFLOP per sample at 100 samples/s on a 400 TFLOP/s device = 25 %
    assert compute_mfu(1e12, 100.0, 400.0) == pytest.approx(0.25)
    assert compute_mfu(1e12, 100.0, None) is None


def test_meter_reports_mfu_only_with_a_peak():
    m = ThroughputMeter(world_size=2, flops_per_sample=1e9, peak_tflops=None)
    m.add(10, 0.0)
    s = m.summary()
    assert s["samples_per_s"] == pytest.approx(2 * s["samples_per_s_per_device"])
    assert "mfu" not in s and s["tflops_per_device"] > 0
    m2 = ThroughputMeter(world_size=1, flops_per_sample=1e9, peak_tflops=100.0)
    m2.add(10, 0.0)
    s2 = m2.summary()
    assert s2["mfu"] == pytest.approx(s2["tflops_per_device"] / 100.0)


def test_meter_tokens_per_s_only_when_counted():
    m = ThroughputMeter(world_size=2)
    m.add(4, 0.0, tokens=4 * 100.0)
    m.add(4, 0.0, tokens=4 * 50.0)
    s = m.summary()
    # 8 samples carrying 600 tokens: tokens/s = 75 x samples/s (same elapsed time)
    assert s["tokens_per_s_per_device"] == pytest.approx(75.0 * s["samples_per_s_per_device"])
    assert s["tokens_per_s"] == pytest.approx(2 * s["tokens_per_s_per_device"])
    m.reset()
    m.add(4, 0.0)  # a task without tokens_per_sample
    assert "tokens_per_s" not in m.summary()


def test_video_text_task_tokens_per_sample_hand_computed():
    import torch

    from megavid.config import compose
    from megavid.tasks.base import VideoTextTask

    cfg = compose(["model=timesformer_tiny"])
    p = cfg.model.video.patch_size
    task = VideoTextTask(cfg)
    # 2 clips of 4 frames at (3p x 2p) pixels: 4 * 3 * 2 = 24 video tokens each; text masks of
    # 5 and 3 real tokens: 4 text tokens per sample on average
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    batch = {"video": torch.zeros(2, 4, 3, 3 * p, 2 * p, dtype=torch.uint8), "attention_mask": mask}
    assert task.tokens_per_sample(batch) == pytest.approx(24 + 4)
