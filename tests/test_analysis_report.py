"""run_analyses and the analyze command: report files, resuming, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from class_space_saliency import analysis, testing
from class_space_saliency.cli import main
from class_space_saliency.untrained import untrained_copy


def test_report_files_resume_and_config_check(tiny_vit, tmp_path, monkeypatch):
    model = tiny_vit("plain")
    images = testing.tiny_images("plain", batch=4)
    data = (images, torch.tensor([0, 1, 2, 3]), testing.box_masks(images))
    config = {"model": "tiny"}
    report = analysis.run_analyses(
        model, data, tmp_path, baseline=untrained_copy(model), config=config, progress=False,
        has_masks=True,
    )  # fmt: skip
    assert set(report.results) == set(analysis.ANALYSES) - {"linear_probes"}
    assert "train" in report.skipped["linear_probes"]  # no training images were given
    stored = json.loads((tmp_path / "analysis.json").read_text())
    assert stored["config"] == {"model": "tiny", "num_images": None, "baseline": True}
    expected = analysis.identifiability(model, data, components=("residual", "attention", "mlp"))
    rates = stored["analyses"]["identifiability"]["result"]["components"]["residual"]
    assert rates["identifiability_rate_percent"] == pytest.approx(
        expected.image_rate["residual"].tolist(), abs=1e-6
    )
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "## identifiability" in markdown and "![identifiability](identifiability.png)" in markdown
    )

    def fail(*args, **kwargs):
        raise AssertionError("a finished analysis ran again")

    for name, spec in analysis.ANALYSES.items():
        monkeypatch.setitem(analysis.ANALYSES, name, dataclasses.replace(spec, run=fail))
    again = analysis.run_analyses(
        model, data, tmp_path, baseline=untrained_copy(model), config=config, progress=False,
        has_masks=True,
    )  # fmt: skip
    assert again.results == {} and "patching" in again.stored
    with pytest.raises(ValueError, match="another configuration"):
        analysis.run_analyses(model, data, tmp_path, config={"model": "other"}, progress=False)
    with pytest.raises(ValueError, match="analyses must be"):
        analysis.run_analyses(model, data, tmp_path / "x", analyses=["memories?"])


def test_analyze_command_on_the_embedded_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        ["analyze", "--num-images", "3", "--analyses", "identifiability", "--out", str(out)]
    )
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    stored = json.loads((out / "analysis.json").read_text())
    assert stored["config"]["data"] == "embedded fashion-scenes evaluation set"
    result = stored["analyses"]["identifiability"]["result"]
    assert result["num_images"] == 3 and result["baseline"]["num_images"] == 3


def test_analyze_command_refusals(tmp_path, capsys):
    assert main(["analyze", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path)]) == 2
    assert "--data" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    code = main(["analyze", "--data", str(missing), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "error:" in capsys.readouterr().err


def test_options_reach_their_analysis_only(tiny_vit, tmp_path):
    model = tiny_vit("plain")
    data = (testing.tiny_images("plain", batch=3), torch.tensor([0, 1, 2]))
    analysis.run_analyses(
        model, data, tmp_path, options={"identifiability": {"layers": [1]}}, progress=False
    )
    stored = json.loads((tmp_path / "analysis.json").read_text())
    assert stored["analyses"]["identifiability"]["result"]["layers"] == [1]
    with pytest.raises(ValueError, match="options must be keyed by names"):
        analysis.run_analyses(model, data, tmp_path / "x", options={"probes?": {}})
