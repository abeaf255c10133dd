"""Fixtures for the launcher unit tests."""

from __future__ import annotations

import pytest
from launch_recorders import Recorders


@pytest.fixture
def recorders(tmp_path) -> Recorders:
    """Recorders for srun, deepspeed, torchrun and scontrol, first on the PATH of ``.env()``."""
    return Recorders(tmp_path, ("srun", "deepspeed", "torchrun", "scontrol"))
