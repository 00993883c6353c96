"""Shared test setup: offline hub, deterministic seeds, paths to ../shared."""

from __future__ import annotations

import os

# Model hubs are unreachable here; fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.safetensors"
BOTTLE = SHARED / "datasets" / "mvtec_ad" / "bottle"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def lite0_weights() -> Path:
    if not LITE0_WEIGHTS.exists():
        pytest.skip(f"shared weights not found at {LITE0_WEIGHTS}")
    return LITE0_WEIGHTS


@pytest.fixture
def bottle() -> Path:
    if not BOTTLE.exists():
        pytest.skip(f"MVTec AD bottle not found at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of many small models: on a busy 2-core machine two
    threads stall each other at every barrier (one run measured 345 s instead of 20 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
