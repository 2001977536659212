"""The command line: demo outputs, attribute on user images, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from class_space_saliency.cli import main
from class_space_saliency.data import load_default_eval_uint8


def test_demo_writes_figures_and_summary(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--methods", "class_space", "rollout"]) == 0
    for name in ("class_space_layers.png", "methods.png", "identifiability.png", "summary.txt"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["examples"]) == 10
    assert len(summary["identifiability"]["token_rate"]) == 6
    assert summary["eval_accuracy"] >= 0.85
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


def test_attribute_writes_overlays_at_image_size(tmp_path, user_images, capsys):
    grey, rgb, _ = user_images
    out = tmp_path / "out"
    code = main(["attribute", str(grey), str(rgb), "--out", str(out), "--target", "Coat",
                 "--layer", "all", "--method", "class_space", "sobel"])  # fmt: skip
    assert code == 0
    assert Image.open(out / "grey_class_space.png").size == (90, 60)
    assert Image.open(out / "rgb_sobel.png").size == (64, 64)
    assert "target Coat" in capsys.readouterr().out


def test_bad_files_are_reported_and_others_processed(tmp_path, user_images, capsys):
    grey, _, corrupt = user_images
    out = tmp_path / "out"
    code = main(["attribute", str(tmp_path / "missing.png"), str(corrupt), str(grey),
                 "--out", str(out)])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "no such image file" in err and "cannot read" in err
    assert (out / "grey_class_space.png").exists()


def test_bad_model_or_target_exit_2(user_images, tmp_path):
    grey = str(user_images[0])
    assert main(["attribute", grey, "--model", "nope", "--out", str(tmp_path)]) == 2
    assert main(["attribute", grey, "--target", "hat", "--out", str(tmp_path)]) == 2


def test_module_entry_point_and_usage_errors():
    ran = subprocess.run(
        [sys.executable, "-m", "class_space_saliency", "attribute", "x.png", "--layer", "one"],
        capture_output=True,
        text=True,
    )
    assert ran.returncode == 2 and "--layer" in ran.stderr and "Traceback" not in ran.stderr
