"""Loading models from hubs: the offline check that spares the hub's minute of retries, and
torchvision classifiers from a local checkpoint (issue 22)."""

from __future__ import annotations

import socket

import pytest
import torch
import torchvision
from huggingface_hub import constants
from torchvision.models import _api

from class_space_saliency import hub, models
from class_space_saliency.hub import WeightsUnavailableError
from class_space_saliency.models import load_model


def test_offline_load_model_fails_at_once_in_the_python_api_s_words(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(WeightsUnavailableError, match=r"offline.*pass weights=PATH") as error:
        load_model("test_vit")
    assert error.value.model == "test_vit" and error.value.reason.startswith("offline: ")
    assert isinstance(error.value, RuntimeError)  # what load_model raised before
    assert before == constants.HF_HUB_OFFLINE


def test_the_network_probe_and_the_cached_only_switch(monkeypatch):
    for variable in (*hub._OFFLINE_VARIABLES, *hub._PROXY_VARIABLES):
        monkeypatch.delenv(variable, raising=False)

    def refuse(*args, **kwargs):
        raise OSError("no route to host")

    class Connection:
        def close(self) -> None:
            pass

    before = constants.HF_HUB_OFFLINE
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub.hub_unreachable() == "huggingface.co cannot be reached"
    with hub.cached_only_when_offline() as reason:
        assert reason is not None and constants.HF_HUB_OFFLINE is True  # no retries
    assert before == constants.HF_HUB_OFFLINE
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: Connection())
    assert hub.hub_unreachable() is None
    with hub.cached_only_when_offline() as reason:
        assert reason is None and before == constants.HF_HUB_OFFLINE
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub.hub_unreachable() is None  # behind a proxy the direct probe says nothing


def tiny_vit_builder(weights=None, num_classes=1000):
    """A torchvision-style builder of a tiny ``VisionTransformer`` (registered by the test)."""
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=num_classes,
    )  # fmt: skip


def test_load_torchvision_from_a_local_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setitem(_api.BUILTIN_MODELS, "tiny_css_vit", tiny_vit_builder)
    original = tiny_vit_builder(num_classes=4).eval()
    torch.save(original.state_dict(), tmp_path / "tv.pth")
    model, prep = load_model("torchvision:tiny_css_vit", weights=tmp_path / "tv.pth",
                             class_names=["a", "b", "c", "d"])  # fmt: skip
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), original(images))
    assert not model.training and model.heads.head.out_features == 4  # read from the head
    assert prep.input_size == (3, 32, 32) and prep.class_names == ("a", "b", "c", "d")
    assert prep.crop_pct == pytest.approx(32 / 36)  # resize to 36, centre crop 32
    assert prep.crop_box(72, 72) == pytest.approx((4.0, 4.0, 68.0, 68.0))
    with pytest.raises(ValueError, match="2 class names given, but the checkpoint"):
        load_model("torchvision:tiny_css_vit", weights=tmp_path / "tv.pth", class_names=["a", "b"])
    with pytest.raises(ValueError, match="unknown torchvision model 'no_such_net'"):
        load_model("torchvision:no_such_net", weights=tmp_path / "tv.pth")


def test_torchvision_weights_offline_fail_at_once(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    monkeypatch.setattr(models, "hub_unreachable", lambda host: f"{host} cannot be reached")
    with pytest.raises(WeightsUnavailableError, match=r"download\.pytorch\.org cannot be reached"):
        load_model("torchvision:resnet18")
