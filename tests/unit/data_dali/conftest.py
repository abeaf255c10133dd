"""Fixtures of the DALI backend tests (helpers live in ``tests/helpers/dali_shards.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.dali_shards import make_shards


@pytest.fixture(scope="session")
def vp9_shards(tmp_path_factory) -> Path:
    """12 VP9 samples (96x64, 20 frames at 10 fps) in 3 shards of 5, 5, 2."""
    return make_shards(tmp_path_factory.mktemp("vp9") / "shards", 12)


@pytest.fixture(scope="session")
def corrupt_shards(tmp_path_factory) -> Path:
    """10 VP9 samples in 2 shards; samples 3 and 7 have corrupt video members."""
    return make_shards(tmp_path_factory.mktemp("bad") / "shards", 10, corrupt=(3, 7))


@pytest.fixture(scope="session")
def h264_shards(tmp_path_factory) -> Path:
    """8 H.264 samples (for the mixed-backend GPU test and the CPU-rejection test)."""
    return make_shards(tmp_path_factory.mktemp("h264") / "shards", 8, codec="h264")


@pytest.fixture(scope="session")
def image_shards(tmp_path_factory) -> Path:
    """10 images (JPEG and PNG, 56x40) in 3 shards of 4, 4, 2."""
    from tests.helpers.dali_shards import make_image_shards

    return make_image_shards(tmp_path_factory.mktemp("images") / "shards", 10)
