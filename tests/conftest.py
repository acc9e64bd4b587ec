"""Shared pytest fixtures: the real data folder and small deterministic settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$SSL4ECG_SHARED_DATA`` or ``<repo>/../shared/data``; ``None`` when absent."""
    env = os.environ.get("SSL4ECG_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    """The real-data folder; the test is skipped with the reason when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("real data not found: set SSL4ECG_SHARED_DATA or place shared/data beside the repo")
    return path


@pytest.fixture
def shared_fixtures() -> Path:
    """The reference-output fixtures folder (``../shared/fixtures``)."""
    env = os.environ.get("SSL4ECG_SHARED_DATA")
    path = (Path(env).parent if env else REPO.parent / "shared") / "fixtures"
    if not path.is_dir():
        pytest.skip("reference fixtures not found beside the repo (../shared/fixtures)")
    return path


@pytest.fixture(autouse=True)
def _few_threads():
    """Tests run on 2-core machines next to each other: keep torch to one thread."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state (torch seeds itself randomly per process,
    so a model built without a seed would otherwise differ from run to run)."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
