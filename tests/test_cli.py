"""The command line: demo outputs, attribute on user images, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from class_space_saliency.cli import main, output_stems
from class_space_saliency.data import load_default_eval, load_default_eval_uint8
from class_space_saliency.methods import ClassSpaceSaliency
from class_space_saliency.models import load_default


def test_demo_writes_figures_and_summary(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--methods", "class_space", "rollout"]) == 0
    for name in ("class_space_layers.png", "methods.png", "identifiability.png", "summary.txt"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["examples"]) == 10
    assert len(summary["identifiability"]["token_rate"]) == 6
    assert summary["eval_accuracy"] >= 0.80  # the fashion-scenes model (80.6 %)
    model, prep = load_default()
    inputs, labels = load_default_eval(preprocessing=prep)
    with torch.no_grad():
        accuracy = (model(inputs).argmax(-1) == labels).float().mean().item()
    assert summary["eval_accuracy"] == round(accuracy, 4)  # from identifiability's [CLS] pass
    assert "fashion_scenes_vit.json" in summary["model"]


@pytest.fixture
def user_images(tmp_path):
    raw, _ = load_default_eval_uint8(2)
    grey = tmp_path / "grey.png"
    Image.fromarray(raw[0, ..., 1]).resize((90, 60)).save(grey)
    rgb = tmp_path / "rgb.jpg"
    Image.fromarray(raw[1]).resize((64, 64)).save(rgb)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not an image")
    return grey, rgb, corrupt


def test_attribute_writes_overlays_on_the_whole_image(tmp_path, user_images, capsys):
    grey, rgb, _ = user_images
    out = tmp_path / "out"
    code = main(["attribute", str(grey), str(rgb), "--out", str(out), "--target", "coat",
                 "--layer", "all", "--methods", "class_space"])  # fmt: skip
    assert code == 0
    width, height = Image.open(out / "grey_class_space.png").size
    assert height == 60 and width > 90  # the photo, then the colour bar
    assert "target Coat" in capsys.readouterr().out


def test_save_maps_writes_raw_maps_and_predictions(tmp_path):
    raw, _ = load_default_eval_uint8(3)
    for folder, k in (("a", 0), ("b", 1), ("b/c", 2)):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(raw[k]).save(tmp_path / folder / "item.png")  # same file names
    out = tmp_path / "out"
    assert main(["attribute", str(tmp_path / "a"), str(tmp_path / "b"), "--save-maps",
                 "--out", str(out), "--layer", "-2"]) == 0  # fmt: skip
    records = json.loads((out / "predictions.json").read_text())
    assert [r["name"] for r in records] == ["a__item", "b__c__item", "b__item"]
    model, prep = load_default()
    inputs, _ = load_default_eval(3, preprocessing=prep)
    expected = ClassSpaceSaliency(model, layer=-2).attribute(
        inputs[[0, 2, 1]], target=[r["target"]["index"] for r in records], upsample=True
    )
    probs = model(inputs[[0, 2, 1]]).softmax(-1).detach()
    for k, record in enumerate(records):
        saved = np.load(out / f"{record['name']}_class_space.npy")
        assert saved.dtype == np.float32 and saved.shape == (32, 32)
        np.testing.assert_allclose(saved, expected[k, 0].numpy(), rtol=1e-4, atol=1e-5)
        top = probs[k].topk(5)
        assert [c["index"] for c in record["top5"]] == top.indices.tolist()
        np.testing.assert_allclose(
            [c["probability"] for c in record["top5"]], top.values, atol=1e-5
        )
        assert record["layer"] == -2 and record["methods"] == ["class_space"]
        assert (out / f"{record['name']}_class_space.png").exists()


def test_output_stems_are_unique():
    from pathlib import Path

    stems = output_stems([Path("x/a/cat.jpg"), Path("x/b/cat.jpg"), Path("x/b/cat.png"),
                          Path("x/a/cat.jpg")])  # fmt: skip
    assert stems == ["a__cat", "b__cat_jpg", "b__cat_png", "a__cat-2"]


def test_bad_files_are_reported_and_others_processed(tmp_path, user_images, capsys):
    grey, _, corrupt = user_images
    out = tmp_path / "out"
    code = main(["attribute", str(tmp_path / "missing.png"), str(corrupt), str(grey),
                 "--out", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "no such image file" in err and "cannot read" in err
    assert (out / "grey_class_space.png").exists()


def test_user_errors_exit_2_with_one_line(user_images, tmp_path, capsys):
    grey = str(user_images[0])
    assert main(["attribute", grey, "--model", "nope", "--out", str(tmp_path)]) == 2
    assert main(["attribute", grey, "--target", "hat", "--out", str(tmp_path)]) == 2
    assert main(["attribute", grey, "--out", grey]) == 2  # an existing file as --out
    assert (
        main(["attribute", grey, "--methods", "sobel", "--layer", "1", "--out", str(tmp_path)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") and len(line) < 400 for line in err)


def test_module_entry_point_usage_error_is_one_line():
    command = [
        sys.executable,
        "-m",
        "class_space_saliency",
        "attribute",
        "x.png",
        "--colormap",
        "no",
    ]
    ran = subprocess.run(command, capture_output=True, text=True)
    assert ran.returncode == 2 and "--colormap" in ran.stderr and "Traceback" not in ran.stderr


def test_help_shows_defaults_choices_and_an_example(capsys):
    for command in ("demo", "attribute", "sanity", "benchmark"):
        with pytest.raises(SystemExit) as exited:
            main([command, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        assert "(default:" in text and "example" in text, command


def test_decompression_bomb_is_skipped_and_photos_warned_about_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")  # over twice the limit
    colourful = np.zeros((40, 40, 3), np.uint8)
    colourful[..., 0] = 255
    for name in ("red1.png", "red2.png"):
        Image.fromarray(colourful).save(tmp_path / name)
    out = tmp_path / "out"
    assert main(["attribute", str(tmp_path), "--out", str(out), "--model", "fashion"]) == 1
    err = capsys.readouterr().err
    assert "bomb.png" in err and "Traceback" not in err
    assert err.count("Fashion-MNIST") == 1  # colour photos are unlike the grey model's data
    assert (out / "red1_class_space.png").exists() and (out / "red2_class_space.png").exists()


def test_real_ctrl_c_saves_and_says_how_to_resume(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    command = [sys.executable, "-m", "class_space_saliency", "benchmark", "--num-images", "1000",
               "--methods", "class_space", "--protocols", "rise2018", "--batch-size", "8",
               "--out", str(out)]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    )
    deadline = time.time() + 120
    while not list(out.glob("results.rank0.jsonl")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a few batches in
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    last = [line for line in err.replace("\r", "\n").splitlines() if line.strip()][-1]
    assert last.startswith("interrupted: records of ") and "rerun the same command" in last
    assert "Traceback" not in err
