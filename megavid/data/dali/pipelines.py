"""The DALI pipelines (video: ``fn.decoders.video``; frames and images: ``fn.decoders.image``),
their output as torch tensors, and DALI's error messages cut to the informative line."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from megavid.errors import ConfigError

HW_DECODER_LOAD = 0.65
"""Share of the JPEGs sent to the hardware JPEG engines of a "mixed" image decoder (the rest go
to CUDA nvJPEG). Measured on an H100: 0.65 gave 1,900-2,100 clips/s, 0 (CUDA only) 820."""



def build_video_pipeline(
    source: Callable[[Any], tuple],
    *,
    batch_size: int,
    img_size: int,
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
    seed: int = 0,
):
    """A built DALI pipeline: encoded videos + per-sample plans -> uint8 clips [T, C, S, S].

    Args:
        source: external-source callback taking ``nvidia.dali.types.BatchInfo`` and returning
            the batch's (encoded uint8 arrays, int32 frame indices [T], float32 roi_start [2],
            float32 roi_end [2], int32 flip scalars); raising StopIteration ends the epoch.
            Batches may be smaller than ``batch_size``.
        batch_size: the largest batch.
        img_size: output height and width.
        device: 'cpu' (no GPU needed) or 'mixed' (NVDEC decode; the output is on the GPU).
        device_id: the CUDA device of a mixed pipeline (None for CPU pipelines).
        num_threads: DALI CPU worker threads.
        prefetch: batches DALI prepares ahead.
        seed: DALI's own seed (no DALI op here draws random numbers; set for completeness).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "mixed"):
        raise ConfigError(f"DALI decode device {device!r} must be 'cpu' or 'mixed'")
    if device == "mixed" and device_id is None:
        device_id = torch.cuda.current_device()

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id if device == "mixed" else None,
                  exec_dynamic=True, prefetch_queue_depth=prefetch, seed=seed)
    def _pipeline():
        encoded, frames, roi_start, roi_end, flip = fn.external_source(
            source=source, num_outputs=5, batch=True, batch_info=True,
            dtype=[types.UINT8, types.INT32, types.FLOAT, types.FLOAT, types.INT32],
        )
        video = fn.decoders.video(encoded, frames=frames, device=device)  # F, H, W, C
        # Crop box + resize in one resampling (antialiased, like the torch transforms).
        video = fn.resize(video, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                          size=[img_size, img_size], antialias=True,
                          interp_type=types.INTERP_LINEAR)
        video = fn.flip(video, horizontal=flip)
        return fn.transpose(video, perm=[0, 3, 1, 2])  # F, C, H, W

    pipe = _pipeline()
    pipe.build()
    return pipe


def dali_to_torch(out) -> torch.Tensor:
    """A DALI TensorList of equal-shape samples -> a torch tensor on the same device.

    CPU: the tensor shares DALI's output buffer (with the dynamic executor every output is a
    buffer of its own that lives as long as a reference to it): no copy of the batch (19 MB for
    16 clips of 8x224^2; measured on the 2-core machine, the copy did not change the decode
    rate, 254 vs 254 clips/s, but it is CPU and memory traffic for nothing). GPU (mixed
    pipelines): a copy into a tensor of torch's allocator, on torch's current stream.
    """
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = out.as_tensor()
    shape = list(tensor.shape())
    if type(out).__name__.endswith("GPU"):  # TensorListGPU (mixed pipelines)
        dst = torch.empty(shape, dtype=torch.uint8,
                          device=torch.device("cuda", torch.cuda.current_device()))
        feed_ndarray(tensor, dst, cuda_stream=torch.cuda.current_stream())
        return dst
    return torch.from_numpy(np.asarray(tensor))


def one_batch_source(inputs: tuple) -> Callable[[Any], tuple]:
    """An external source for a pipeline that yields ``inputs`` (one batch) once, then stops
    (one-sample fault isolation, the decode checks of ``megavid info``)."""
    done: list[int] = []

    def source(info):
        if done:
            raise StopIteration
        done.append(1)
        return inputs

    return source



def build_frames_pipeline(
    source: Callable[[Any], tuple],
    *,
    batch_size: int,
    img_size: int,
    device: str = "cpu",
    device_id: int | None = None,
    num_threads: int = 1,
    prefetch: int = 2,
    seed: int = 0,
    hw_decoder_load: float = HW_DECODER_LOAD,
):
    """A built DALI pipeline: JPEG frames + per-frame crop boxes -> uint8 frames [C, S, S].

    One DALI sample is one frame: a batch of B clips of T frames is B*T samples, which the
    loader reshapes to [B, T, C, S, S] (no copy). Per frame, the crop box and flip of its clip.

    Args:
        source: external-source callback taking ``BatchInfo`` and returning (JPEG uint8 arrays,
            float32 roi_start [2], float32 roi_end [2], int32 flip scalars), one entry per
            frame; StopIteration ends the pass.
        batch_size: the most frames per iteration (clips x frames per clip).
        img_size: output side.
        device: 'cpu' (libjpeg-turbo in DALI's CPU threads) or 'mixed' (hardware JPEG engines
            + nvJPEG; output on the GPU).
        device_id: CUDA device of a mixed pipeline.
        num_threads: DALI CPU threads.
        prefetch: batches DALI prepares ahead.
        seed: DALI's seed (no random op here).
        hw_decoder_load: mixed only: share of the hardware JPEG decoder (see HW_DECODER_LOAD).
    """
    from nvidia.dali import fn, pipeline_def, types

    if device not in ("cpu", "mixed"):
        raise ConfigError(f"DALI decode device {device!r} must be 'cpu' or 'mixed'")
    if device == "mixed" and device_id is None:
        device_id = torch.cuda.current_device()
    extra = {"hw_decoder_load": hw_decoder_load} if device == "mixed" else {}

    @pipeline_def(batch_size=batch_size, num_threads=num_threads,
                  device_id=device_id if device == "mixed" else None,
                  exec_dynamic=True, prefetch_queue_depth=prefetch, seed=seed)
    def _pipeline():
        jpegs, roi_start, roi_end, flip = fn.external_source(
            source=source, num_outputs=4, batch=True, batch_info=True,
            dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32])
        images = fn.decoders.image(jpegs, device=device, output_type=types.RGB, **extra)
        # the same crop-box resampling as the video pipeline (one antialiased resize)
        images = fn.resize(images, roi_start=roi_start, roi_end=roi_end, roi_relative=False,
                           size=[img_size, img_size], antialias=True,
                           interp_type=types.INTERP_LINEAR)
        images = fn.flip(images, horizontal=flip)
        return fn.transpose(images, perm=[2, 0, 1])  # C, H, W

    pipe = _pipeline()
    pipe.build()
    return pipe


def _first_error_line(error: BaseException) -> str:
    """The informative part of a DALI error, which wraps the cause in the pipeline definition's
    traceback: the FFmpeg reason ("... due to: Invalid data found ...") when there is one, else
    the failed assertion, else the operator and what it "encountered" (image decoders:
    "fn.decoders.image: nvImageCodec failure: '#17'"), else the last line."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    lines = [ln for ln in lines if ln != "Current pipeline object is no longer valid."]
    for ln in lines:
        if "due to" in ln:
            return ln[ln.rfind("] ") + 2 if "] " in ln else 0:][:300]
    for ln in lines:
        if ln.startswith(("Assert", "Failed", "Error while")):
            return ln[:300]
    if "encountered:" in lines[:-1]:
        cause = lines[lines.index("encountered:") + 1]
        op = next((ln.split("`")[1] for ln in lines if ln.startswith("Error in") and
                   ln.count("`") >= 2), "")
        return (f"{op.removeprefix('nvidia.dali.')}: {cause}" if op else cause)[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]
