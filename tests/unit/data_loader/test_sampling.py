"""Frame sampling: values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from megavid.data.order import get_fast_sample_rng
from megavid.data.sampling import get_sample_rng, sample_timestamps, timestamps_to_indices
from megavid.errors import DataError


def test_eval_timestamps_are_segment_centres():
    # 2 s, 4 frames: segments of 0.5 s, centres 0.25, 0.75, 1.25, 1.75
    np.testing.assert_allclose(sample_timestamps(4, 2.0, train=False), [0.25, 0.75, 1.25, 1.75])
    # window [1, 3] of a 10 s video, 2 frames: segments [1, 2), [2, 3) -> 1.5, 2.5
    np.testing.assert_allclose(sample_timestamps(2, 10.0, start=1.0, end=3.0, train=False),
                               [1.5, 2.5])
    # one frame: the middle of the window
    np.testing.assert_allclose(sample_timestamps(1, 4.0, start=1.0, end=2.0, train=False), [1.5])


def test_window_is_clamped_to_the_video():
    # end past the video -> 0..2, start < 0 -> 0
    np.testing.assert_allclose(sample_timestamps(2, 2.0, start=-1.0, end=5.0, train=False),
                               [0.5, 1.5])
    # empty window (start == end): every frame at the start
    np.testing.assert_allclose(sample_timestamps(3, 2.0, start=1.0, end=1.0, train=False),
                               [1.0, 1.0, 1.0])


def test_train_timestamps_have_one_uniform_offset_per_segment():
    rng = np.random.default_rng(123)
    ts = sample_timestamps(4, 2.0, start=0.0, end=2.0, train=True, rng=rng)
    u = np.random.default_rng(123).random(4)  # the same draws, by hand
    np.testing.assert_allclose(ts, [0.0 + 0.5 * u[0], 0.5 + 0.5 * u[1], 1.0 + 0.5 * u[2],
                                    1.5 + 0.5 * u[3]])
    # every timestamp stays inside its segment, over many draws
    rng = np.random.default_rng(0)
    for _ in range(200):
        ts = sample_timestamps(8, 3.0, start=1.0, end=2.6, train=True, rng=rng)
        seg = (np.arange(8) * 0.2 + 1.0)
        assert np.all(ts >= seg - 1e-12) and np.all(ts < seg + 0.2)


def test_train_needs_an_rng_and_frames_in_range():
    with pytest.raises(ValueError):
        sample_timestamps(4, 2.0, train=True)
    for bad in (0, 97):
        with pytest.raises(DataError, match="1..96"):
            sample_timestamps(bad, 2.0, train=False)
    with pytest.raises(DataError, match="duration"):
        sample_timestamps(4, 0.0, train=False)
    assert len(sample_timestamps(96, 1.0, train=False)) == 96


def test_timestamps_to_indices_frame_on_screen_and_clamped():
    # fps 10: frame i is shown during [i/10, (i+1)/10): 0.04 -> 0; 0.099 -> 0; 0.1 -> 1 (and
    # 0.3 computed as 0.1 * 3 = 0.30000000000000004 or as 0.7 - 0.4 = 0.29999999999999993 -> 3);
    # 0.26 -> 2;
    # 1.5 -> 15 -> clamped 9; -0.3 -> 0
    ts = np.array([0.04, 0.099, 0.1, 0.1 * 3, 0.7 - 0.4, 0.26, 1.5, -0.3])
    idx = timestamps_to_indices(ts, 10.0, 10)
    assert idx.tolist() == [0, 0, 1, 3, 3, 2, 9, 0]
    assert idx.dtype == np.int64
    # 8 eval frames of a 2 s, 8 fps video (16 frames) land on the odd frames
    ts = sample_timestamps(8, 2.0, train=False)
    assert timestamps_to_indices(ts, 8.0, 16).tolist() == [1, 3, 5, 7, 9, 11, 13, 15]
    # as many segments as frames: segment k is frame k, in eval and for every train draw
    rng = np.random.default_rng(0)
    assert timestamps_to_indices(sample_timestamps(8, 1.0, train=False), 8.0, 8).tolist() == list(range(8))
    for _ in range(50):
        ts = sample_timestamps(8, 1.0, train=True, rng=rng)
        assert timestamps_to_indices(ts, 8.0, 8).tolist() == list(range(8))
    # 8 train frames of 16: segment k draws frame 2k or 2k + 1, never a neighbour's
    for _ in range(50):
        idx = timestamps_to_indices(sample_timestamps(8, 2.0, train=True, rng=rng), 8.0, 16)
        assert ((idx // 2) == np.arange(8)).all()
    # more clip frames than video frames repeat frames: each twice
    assert timestamps_to_indices(sample_timestamps(4, 0.5, train=False), 4.0, 2).tolist() == \
        [0, 0, 1, 1]


def test_sample_rng_streams_are_reproducible_and_independent():
    a = get_sample_rng(1, 2, 3, "frames").random(4)
    np.testing.assert_array_equal(a, get_sample_rng(1, 2, 3, "frames").random(4))
    np.testing.assert_array_equal(a, np.random.default_rng([1, 2, 3, 0]).random(4))
    assert not np.allclose(a, get_sample_rng(1, 2, 3, "caption").random(4))
    assert not np.allclose(a, get_sample_rng(1, 3, 3, "frames").random(4))
    assert not np.allclose(a, get_sample_rng(1, 2, 4, "frames").random(4))
    with pytest.raises(KeyError):
        get_sample_rng(0, 0, 0, "nope")


def test_fast_sample_rng_draws_what_get_sample_rng_draws():
    # the reference is sampling.get_sample_rng (numpy's SeedSequence of the Python ints);
    # values past uint32 take several SeedSequence words, which the fast path hands over
    for seed, epoch, index in [(0, 0, 0), (3, 7, 11), (2**32 - 1, 5, 2**31), (2**40, 1, 2),
                               (12345678901234, 2**33, 7), (1, 0, 2**32)]:
        for stream in ("frames", "caption", "augment"):
            a = get_fast_sample_rng(seed, epoch, index, stream)
            b = get_sample_rng(seed, epoch, index, stream)
            assert np.array_equal(a.random(6), b.random(6))
            assert np.array_equal(a.integers(1000, size=4), b.integers(1000, size=4))
    with pytest.raises(KeyError):
        get_fast_sample_rng(0, 0, 0, "colour")
