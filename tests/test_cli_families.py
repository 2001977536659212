"""``attribute`` on every supported family (Hugging Face, open_clip, timm, torchvision, a CNN),
``--layer`` lists for every layered method, per-layer panels for a photo, refusals and the
offline case in one line each (issue 22). Tiny models are saved to temporary folders and
loaded the way a user loads theirs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from class_space_saliency.cli import main
from class_space_saliency.methods import create_method, list_methods, method_info
from class_space_saliency.models import load_model

LAYERED = [n for n in list_methods(needs_fitting=False) if "layer" in method_info(n).options]


@pytest.fixture
def photo(tmp_path) -> Path:
    """A 48 x 40 colour photo with structure (a bright square on noise)."""
    pixels = np.random.default_rng(0).integers(0, 120, (40, 48, 3), dtype=np.uint8)
    pixels[8:24, 20:40] = (230, 180, 40)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    return path


def attribute(capsys, *argv) -> tuple[int, str, str]:
    """Run ``attribute``; (exit code, stdout, stderr without progress bars)."""
    code = main(["attribute", *map(str, argv)])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith(("error", "warning"))]
    return code, out, "\n".join(lines)


def saved(out: Path) -> dict:
    return json.loads((out / "predictions.json").read_text())[0]


def check_per_layer_maps(out: Path, record: dict, model, x, methods, layers) -> None:
    """Each method's per-layer maps equal the Python API's map of that block, and the
    combined map (class_space: mean) the mean of the per-layer maps."""
    target = record["target"]["index"]
    for name in methods:
        entry = record["layer_maps"][name]
        assert entry["layers"] == [f"layer {b}" for b in layers]
        per_layer = np.load(out / entry["file"])
        assert per_layer.shape == (len(layers), *x.shape[-2:])
        assert (out / f"{record['name']}_{name}_layers.png").stat().st_size > 0
        for k, block in enumerate(layers):
            want = create_method(name, model, layer=block).attribute(x, target, upsample=True)
            np.testing.assert_allclose(per_layer[k], want[0, 0].numpy(), rtol=1e-4, atol=1e-5)
        if name == "class_space":
            combined = np.load(out / record["maps"][name])
            np.testing.assert_allclose(combined, per_layer.mean(0), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- the families
def test_attribute_on_a_saved_hugging_face_model(tmp_path, photo, capsys):
    transformers = pytest.importorskip("transformers")
    from class_space_saliency.testing import tiny_hf_vit

    model = tiny_hf_vit("vit")
    model.save_pretrained(tmp_path / "hf")
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    processor.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    code, stdout, err = attribute(capsys, photo, "--model", f"hf:{tmp_path / 'hf'}", "--methods",
                                  "class_space", "gradcam", "--layer", "all", "--save-maps",
                                  "--out", out)  # fmt: skip
    assert code == 0, err
    record = saved(out)
    # the whole photo resized to 32 x 32 and normalised with mean = std = 0.5, by hand
    resized = Image.open(photo).convert("RGB").resize((32, 32), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - 0.5) / 0.5
    with torch.no_grad():
        probs = model(x).logits.softmax(-1)[0]
    top = probs.topk(5)
    assert [c["index"] for c in record["top5"]] == top.indices.tolist()
    np.testing.assert_allclose([c["probability"] for c in record["top5"]], top.values, atol=1e-5)
    check_per_layer_maps(out, record, model, x, ["class_space", "gradcam"], [0, 1])
    assert "photo_class_space.png" in stdout and "photo_gradcam_layers.png" in stdout


@pytest.fixture
def tiny_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    config = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tiny-css-cli.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "cfg")
    torch.manual_seed(0)
    clip = open_clip.create_model("tiny-css-cli", pretrained=None)
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    return tmp_path / "clip.pt"


def test_attribute_on_an_open_clip_model_with_layer_lists(tmp_path, photo, tiny_open_clip, capsys):
    prompts = ["a photo of a cat", "a photo of a dog", "a tree"]
    out = tmp_path / "out"
    methods = ["class_space", "gradcam", "raw_attention"]
    code, _, err = attribute(capsys, photo, "--model", "open_clip:tiny-css-cli", "--weights",
                             tiny_open_clip, "--prompts", *prompts, "--target", "a tree",
                             "--methods", *methods, "--layer", "0,1", "--save-maps",
                             "--out", out)  # fmt: skip
    assert code == 0, err
    record = saved(out)
    assert record["target"]["name"] == "a tree"
    model, prep = load_model("open_clip:tiny-css-cli", weights=tiny_open_clip, prompts=prompts)
    x = prep(Image.open(photo).convert("RGB"))[None]
    check_per_layer_maps(out, record, model, x, methods, [0, 1])


@pytest.fixture
def timm_checkpoint(tmp_path) -> Path:
    """A 3-class fine-tune of timm's ``test_vit`` (6 blocks, 160 px), saved as a state dict."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "names.txt").write_text("cat\ndog\ntree\n")
    return tmp_path / "vit.pth"


def test_layer_lists_work_for_every_layered_method(tmp_path, photo, timm_checkpoint, capsys):
    out = tmp_path / "out"
    code, _, err = attribute(capsys, photo, "--model", "test_vit", "--weights", timm_checkpoint,
                             "--class-names", tmp_path / "names.txt", "--target", "dog",
                             "--methods", *LAYERED, "--layer", "0,2,-1", "--save-maps",
                             "--out", out)  # fmt: skip
    assert code == 0, err
    assert set(LAYERED) >= {"class_space", "class_space_gradient", "gradcam", "raw_attention"}
    record = saved(out)
    assert record["target"] == {"index": 1, "name": "dog"} and record["layer"] == [0, 2, -1]
    model, prep = load_model("test_vit", weights=timm_checkpoint)
    x = prep(Image.open(photo).convert("RGB"))[None]
    check_per_layer_maps(out, record, model, x, LAYERED, [0, 2, 5])
    # one-layer methods draw panels only; methods that combine layers draw the combination
    assert set(record["maps"]) == {"class_space", "class_space_gradient",
                                   "class_space_contributions",
                                   "class_space_gradient_paper"}  # fmt: skip


def test_layer_all_writes_a_panel_per_block_for_a_photo(tmp_path, photo, timm_checkpoint, capsys):
    out = tmp_path / "out"
    code, stdout, err = attribute(capsys, photo, "--model", "test_vit", "--weights",
                                  timm_checkpoint, "--layer", "all", "--out", out)  # fmt: skip
    assert code == 0, err
    assert "photo_class_space.png, photo_class_space_layers.png" in stdout
    panel = Image.open(out / "photo_class_space_layers.png")
    assert panel.size[0] > 4 * panel.size[1]  # one row: the photo and six layers side by side


def test_attribute_on_a_torchvision_vit(tmp_path, photo, capsys, monkeypatch):
    import torchvision
    from torchvision.models import _api

    def tiny_vit(weights=None, num_classes=1000):
        torch.manual_seed(0)
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
            num_classes=num_classes,
        )  # fmt: skip

    monkeypatch.setitem(_api.BUILTIN_MODELS, "tiny_css_vit", tiny_vit)  # a registered builder
    torch.save(tiny_vit(num_classes=4).state_dict(), tmp_path / "tv.pth")
    out = tmp_path / "out"
    methods = ["class_space", "gradcam", "raw_attention"]
    code, _, err = attribute(capsys, photo, "--model", "torchvision:tiny_css_vit", "--weights",
                             tmp_path / "tv.pth", "--methods", *methods, "--layer", "0,1",
                             "--save-maps", "--out", out)  # fmt: skip
    assert code == 0, err
    model, prep = load_model("torchvision:tiny_css_vit", weights=tmp_path / "tv.pth")
    assert model.num_classes == 4 and prep.input_size == (3, 32, 32)
    x = prep(Image.open(photo).convert("RGB"))[None]
    check_per_layer_maps(out, saved(out), model, x, methods, [0, 1])
    code, _, err = attribute(capsys, photo, "--model", "torchvision:tiny_css_vit", "--weights",
                             tmp_path / "tv.pth", "--methods", "chefer", "--out", out)  # fmt: skip
    assert code == 2
    assert err == (
        "error: --methods chefer cannot read differentiable attention from VisionTransformer "
        "(use class_space or gradcam)"
    )


@pytest.fixture
def cnn_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), tmp_path / "cnn.pth")
    return tmp_path / "cnn.pth"


def test_gradcam_and_controls_on_a_cnn_given_a_layer(tmp_path, photo, cnn_checkpoint, capsys):
    out = tmp_path / "out"
    code, _, err = attribute(capsys, photo, "--model", "test_resnet", "--weights",
                             cnn_checkpoint, "--methods", "gradcam", "--layer", "layer4",
                             "--save-maps", "--out", out)  # fmt: skip
    assert code == 0, err
    record = saved(out)
    model, prep = load_model("test_resnet", weights=cnn_checkpoint)
    x = prep(Image.open(photo).convert("RGB"))[None]
    features = []  # Grad-CAM by hand: layer4's maps weighted by the mean gradient
    handle = model.layer4.register_forward_hook(
        lambda module, args, output: features.append(output)
    )
    logits = model(x)
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, record["target"]["index"]], features[0])
    cam = (grad.mean((2, 3), keepdim=True) * features[0]).sum(1, keepdim=True).clamp(min=0)
    want = torch.nn.functional.interpolate(cam.double(), x.shape[-2:], mode="bilinear")
    got = np.load(out / record["maps"]["gradcam"])
    np.testing.assert_allclose(got, want[0, 0].float().detach().numpy(), rtol=1e-4, atol=1e-6)

    code, _, err = attribute(capsys, photo, "--model", "test_resnet", "--weights",
                             cnn_checkpoint, "--methods", "sobel", "random", "intensity",
                             "--out", out)  # fmt: skip
    assert code == 0, err  # the classes come from the model, the grid is 16-pixel cells
    code, _, err = attribute(capsys, photo, "--model", "test_resnet", "--weights",
                             cnn_checkpoint, "--methods", "gradcam", "--layer", "layer3,layer4",
                             "--out", out)  # fmt: skip
    assert code == 0, err
    assert (out / "photo_gradcam_layers.png").exists()


# ---------------------------------------------------------------------------- one-line refusals
def pooled_vit_config(folder: Path) -> Path:
    """A ``.json`` model config (weights next to it) of a tiny mean-pooled timm ViT."""
    from safetensors.torch import save_file

    kwargs = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                  global_pool="avg", class_token=False)  # fmt: skip
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **kwargs)
    save_file(model.state_dict(), folder / "pooled.safetensors")
    config = dict(kwargs=kwargs, mean=[0.5] * 3, std=[0.5] * 3, input_size=[3, 32, 32],
                  class_names=["a", "b", "c"])  # fmt: skip
    (folder / "pooled.json").write_text(json.dumps(config))
    return folder / "pooled.json"


def test_refusals_are_one_short_line_in_the_cli_s_own_words(tmp_path, photo, cnn_checkpoint,
                                                           capsys):  # fmt: skip
    cnn = ["--model", "test_resnet", "--weights", cnn_checkpoint, "--out", tmp_path / "out"]
    cases = {
        ("--methods", "class_space"): "--methods class_space needs a Vision Transformer "
        "(timm, torchvision, Hugging Face, open_clip; Swin), not ResNet; on other models use "
        "gradcam --layer layer4, random, sobel or intensity",
        ("--methods", "gradcam"): "--methods gradcam on ResNet (not a ViT) needs --layer "
        "MODULE, e.g. --layer layer4",
        ("--methods", "gradcam", "--layer", "layer9"): "--layer layer9: ResNet has no module "
        "'layer9' (its top-level modules: conv1, bn1, act1, maxpool, layer1, layer2, layer3, "
        "layer4, global_pool, fc)",
    }
    for options, line in cases.items():
        code, _, err = attribute(capsys, photo, *cnn, *options)
        assert code == 2 and err == f"error: {line}", err
    pooled = pooled_vit_config(tmp_path)  # a ViT whose head averages the image tokens
    code, _, err = attribute(capsys, photo, "--model", pooled, "--methods", "class_space_gradient",
                             "--out", tmp_path / "out")  # fmt: skip
    assert code == 2 and err == (
        "error: --methods class_space_gradient needs a [CLS] token that the head reads; the "
        "head of VisionTransformer pools image tokens (use class_space)"
    )
    vit = ["--out", tmp_path / "out"]  # the default embedded model
    code, _, err = attribute(capsys, photo, *vit, "--layer", "blocks.0")
    assert (
        code == 2
        and err == "error: --layer blocks.0: class_space takes block numbers, not module names"
    )


def test_offline_is_detected_at_once_and_names_the_weights_option(photo, capsys, monkeypatch,
                                                                 tmp_path):  # fmt: skip
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub_flag = constants.HF_HUB_OFFLINE
    code, _, err = attribute(capsys, photo, "--model", "test_vit", "--out", tmp_path / "out")
    assert code == 2
    assert err == (
        "error: cannot get the weights of test_vit (offline: HF_HUB_OFFLINE is set, and the "
        "weights are not in the local cache); pass --weights PATH (a local checkpoint)"
    )
    assert hub_flag == constants.HF_HUB_OFFLINE  # restored
