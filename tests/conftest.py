"""Shared test setup: offline hub, deterministic seeds, paths to ../shared."""

from __future__ import annotations

import os

# Model hubs are unreachable here; fail fast instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.fixture
def offline_machine(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine without the model hub, as a user's: no name resolves and no connection opens,
    and huggingface_hub's offline flag (set above for every other test) is off."""
    from huggingface_hub import constants

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise OSError("test: no network on this machine")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    yield
    assert constants.HF_HUB_OFFLINE is False  # fastflow's cache-only switch was put back
