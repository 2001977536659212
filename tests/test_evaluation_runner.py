"""Benchmark runner: records, resume, repair, config checks, torchrun shards, datasets, CLI."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from class_space_saliency import ClassSpaceSaliency, testing
from class_space_saliency.evaluation import (
    PROTOCOLS,
    ImageFolderDataset,
    UnreadableImageError,
    load_config,
    load_records,
    perturbation_curves,
    run_benchmark,
    summarize,
    write_report,
)
from class_space_saliency.evaluation.cli import add_benchmark_command
from class_space_saliency.evaluation.datasets import balanced_order
from class_space_saliency.evaluation.protocols import protocol_to_dict
from class_space_saliency.testing import tiny_benchmark_data

NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
PRESET_NAMES = ["chefer2021", "rise2018", "vilas2023"]
CLI_PRESETS = [*PRESET_NAMES, "road2022"]
QUICK = dict(batch_size=3, progress=False, n_boot=50)


@pytest.fixture
def model(tiny_vit):
    return tiny_vit("plain")


@pytest.fixture
def data(model):
    """7 images; the model is right on 5 of them."""
    return tiny_benchmark_data(7, model)


class Interrupting:
    """Wraps a method; raises KeyboardInterrupt on its ``stop_at``-th call (1-based)."""

    def __init__(self, method: ClassSpaceSaliency, stop_at: int | None = None) -> None:
        self.method, self.stop_at, self.calls = method, stop_at, 0

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.method.attribute(inputs, target)


def methods_for(model, stop_at=None) -> dict:
    return {
        "class_space": ClassSpaceSaliency(model),
        "first_block": Interrupting(ClassSpaceSaliency(model, layer=0), stop_at),
    }


def run(model, data, methods, out_dir, **kwargs):
    return run_benchmark(
        model,
        data,
        methods,
        kwargs.pop("protocols", PRESET_NAMES),
        **NORM,
        out_dir=out_dir,
        **{**QUICK, **kwargs},
    )


@pytest.fixture(scope="module")
def reference(shared_models, tmp_path_factory):
    """An uninterrupted run: (folder, report)."""
    out_dir = tmp_path_factory.mktemp("reference")
    model = shared_models.get(testing.tiny_vit, "plain")
    return out_dir, run(model, tiny_benchmark_data(7, model), methods_for(model), out_dir)


def test_records_and_report(reference):
    out_dir, report = reference
    records = load_records(out_dir)
    assert len(records) == 7 * 2 * 6  # images x methods x curves
    record = next(r for r in records if r["protocol"] == "vilas2023/positive")
    assert set(record) == {
        "image",
        "method",
        "protocol",
        "label",
        "prediction",
        "target",
        "auc",
        "curve",
    }
    assert len(record["curve"]) == 15 and record["target"] == record["label"]  # 16 tokens
    chefer = next(r for r in records if r["protocol"] == "chefer2021/positive")
    assert chefer["target"] == chefer["prediction"] and len(chefer["curve"]) == 10
    assert report.clean_accuracy == pytest.approx(5 / 7)
    assert [f.name for f in report.files] == [
        "report.md",
        "report.csv",
        "curves_chefer2021.png",
        "curves_rise2018.png",
        "curves_vilas2023.png",
    ]
    assert all(f.stat().st_size > 0 for f in report.files)
    markdown = (out_dir / "report.md").read_text()
    assert (
        "clean accuracy 0.7143 (5 classified correctly)" in markdown
        and "## vilas2023/negative (higher is better)" in markdown
        and "## Verdicts on the 5 correctly classified images only" in markdown
    )
    csv_lines = (out_dir / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 6 * 2 * 2  # all images, then the correct ones
    config = load_config(out_dir)
    assert config["n"] == 7 and config["methods"][1] == {
        "name": "first_block",
        "class": "Interrupting",
    }
    assert config["protocols"][0]["steps"] == [i / 10 for i in range(10)]


def test_resume_after_interruption_equals_uninterrupted(model, data, reference, tmp_path):
    # two map classes per batch (predicted for chefer/rise, label for vilas): call 5 is batch 3
    with pytest.raises(KeyboardInterrupt):
        run(model, data, methods_for(model, stop_at=5), tmp_path)
    assert {r["image"] for r in load_records(tmp_path)} == set(range(6))
    methods = methods_for(model)
    run(model, data, methods, tmp_path)
    assert methods["first_block"].calls == 2  # only the last batch was computed again
    assert load_records(tmp_path) == load_records(reference[0])


def test_cut_short_last_line_is_repaired(model, data, reference, tmp_path):
    run(model, data, methods_for(model), tmp_path)
    shard = tmp_path / "results.rank0.jsonl"
    written = shard.read_bytes()
    shard.write_bytes(written[: len(written) - 40])  # killed while writing the last record
    assert len(load_records(tmp_path)) == 7 * 2 * 6 - 1
    methods = methods_for(model)
    run(model, data, methods, tmp_path)
    assert shard.read_bytes().endswith(b"\n")
    assert load_records(tmp_path) == load_records(reference[0])
    lines = shard.read_bytes().splitlines()
    shard.write_bytes(b"\n".join([*lines[:3], b'{"image": 0, "meth', *lines[3:]]) + b"\n")
    with pytest.raises(ValueError, match="not a JSON record"):
        load_records(tmp_path)


@pytest.mark.parametrize("change", [dict(seed=1), dict(model_name="other")])
def test_config_mismatch_raises(model, data, reference, change):
    with pytest.raises(ValueError, match="different benchmark configuration"):
        run(model, data, methods_for(model), reference[0], **change)


def test_a_run_grows_in_its_folder(model, data, tmp_path, capsys):
    run(model, data, ["class_space"], tmp_path, protocols=["chefer2021/positive"], n=3)
    first = load_records(tmp_path)
    assert len(first) == 3
    report = run(model, data, ["class_space", "random"], tmp_path,
                 protocols=["chefer2021/positive", "chefer2021/negative"], n=5)  # fmt: skip
    assert "3 of 5 images already done" not in capsys.readouterr().err  # new methods to do
    records = load_records(tmp_path)
    assert len(records) == 5 * 2 * 2
    assert [r for r in records if r in first] == first  # earlier records kept as they were
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["n"] == 5 and [m["name"] for m in config["methods"]] == ["class_space", "random"]
    assert {row.method for row in report.rows} == {"class_space", "random"}
    run(model, data, ["class_space"], tmp_path, protocols=["chefer2021/positive"], n=5,
        progress=True)  # fmt: skip
    assert "5 of 5 images already done" in capsys.readouterr().err
    assert len(load_records(tmp_path)) == 20


def test_different_weights_or_method_options_raise(model, tmp_path):
    data = tiny_benchmark_data(3, model)
    model = copy.deepcopy(model)  # its weights change below
    run(model, data, ["class_space"], tmp_path, protocols=["chefer2021/positive"])
    with pytest.raises(ValueError, match=r"differs in \['methods'\]"):
        run(
            model,
            data,
            ["class_space"],
            tmp_path,
            protocols=["chefer2021/positive"],
            method_kwargs={"class_space": {"layer": 0}},
        )
    with torch.no_grad():
        model.head.bias.add_(1.0)
    with pytest.raises(ValueError, match=r"differs in \['model'\]"):
        run(model, data, ["class_space"], tmp_path, protocols=["chefer2021/positive"])


def test_mean_baseline_uses_the_evaluated_images(model, tmp_path):
    model = copy.deepcopy(model)  # put in training mode below
    images, labels = tiny_benchmark_data(3, model)
    protocol = dataclasses.replace(
        PROTOCOLS["chefer2021/positive"], name="mean/positive", baseline="mean", score="logit"
    )
    model.train()
    run(model, (images, labels), ["class_space"], tmp_path, protocols=[protocol])
    assert all(module.training for module in model.modules())  # restored after the run
    model.eval()
    maps = ClassSpaceSaliency(model).attribute(images, target=None)
    _, expected = perturbation_curves(
        model, images, maps, labels, protocol, **NORM, dataset_mean=images.mean((0, 2, 3))
    )
    found = np.array([r["curve"] for r in load_records(tmp_path)])
    np.testing.assert_allclose(found, expected.numpy(), atol=1e-5)


def test_summary_statistics_by_hand():
    # chefer2021/positive (lower is better), x = 0 .. 0.9; curves are constant per image
    config = {
        "n": 4,
        "seed": 0,
        "model": {"name": "toy", "fingerprint": "0"},
        "methods": [{"name": "class_space"}, {"name": "random"}],
        "protocols": [protocol_to_dict(PROTOCOLS["chefer2021/positive"])],
    }
    levels = {"class_space": [0, 0, 1, 0], "random": [1, 0, 1, 1]}
    records = [
        {
            "image": i,
            "method": m,
            "protocol": "chefer2021/positive",
            "curve": [float(v)] * 10,
            "auc": 90.0 * v,
            "label": 0,
            "prediction": i % 2,
            "target": 0,
        }
        for m, values in levels.items()
        for i, v in enumerate(values)
    ]
    records.append({"image": 4, "skipped": "a/b.png", "reason": "OSError: broken"})
    report = summarize(records, config, n_boot=2000, seed=0)
    assert report.clean_accuracy == 0.5 and report.n_images == 4 and len(report.skipped) == 1
    ours, rand = report.rows
    assert (ours.auc, rand.auc) == (pytest.approx(22.5), pytest.approx(67.5))
    assert ours.diff is None and rand.diff == pytest.approx(-45.0)
    assert rand.share_reference_better == 0.5  # images 0 and 3; ties elsewhere
    assert 0 <= ours.auc_low < ours.auc < ours.auc_high <= 90
    assert rand.diff_low < rand.diff < rand.diff_high <= 0
    again = summarize(records, config, n_boot=2000, seed=0)
    assert again.rows == report.rows


# ---------------------------------------------------------------------------- torchrun
SCRIPT = """
import sys
import torch
from class_space_saliency.evaluation import run_benchmark
from class_space_saliency.testing import tiny_benchmark_data, tiny_vit


def main(out_dir):
    model = tiny_vit("plain")
    images, labels = tiny_benchmark_data(5, model)
    masks = torch.zeros(5, 1, 32, 32, dtype=torch.bool)
    masks[..., 4:20, 8:24] = True
    return run_benchmark(model, (images, labels, masks), ["class_space"],
        ["chefer2021/positive", "vilas2023/negative", "road2022/morf"], (0.5,) * 3, (0.5,) * 3,
        out_dir, batch_size=2, progress=False, n_boot=50)


if __name__ == "__main__":
    main(sys.argv[1])
"""


def assert_same_records(first: list[dict], second: list[dict]) -> None:
    """Equal records; values computed from maps compared to float32 rounding."""
    numeric = ("auc", "curve", "extra_curves", "localisation")
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a.items() if k not in numeric} == {
            k: v for k, v in b.items() if k not in numeric
        }
        assert a.keys() == b.keys()
        if "curve" in a:
            np.testing.assert_allclose(a["curve"] + [a["auc"]], b["curve"] + [b["auc"]], atol=1e-5)
            assert a.get("extra_curves") == b.get("extra_curves")
        if "localisation" in a:
            assert a["localisation"] == pytest.approx(b["localisation"], abs=1e-6)


def test_torchrun_two_processes_equal_one(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    done = subprocess.run(
        [*command, str(script), str(tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runpy.run_path(str(script))["main"](tmp_path / "one")
    shards = sorted(p.name for p in (tmp_path / "two").glob("results.rank*.jsonl"))
    assert shards == ["results.rank0.jsonl", "results.rank1.jsonl"]
    two, one = load_records(tmp_path / "two"), load_records(tmp_path / "one")
    assert_same_records(two, one)
    assert (tmp_path / "two" / "report.md").exists()
    assert (
        write_report(tmp_path / "two").clean_accuracy
        == write_report(tmp_path / "one").clean_accuracy
    )


# ---------------------------------------------------------------------------- datasets
def image_folder(root: Path) -> Path:
    generator = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            pixels = generator.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "cat" / "full.jpg")
    jpeg = (root / "cat" / "full.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "cat" / "full.jpg").unlink()
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


PREPROCESS = transforms.Compose(
    [transforms.Resize((32, 32)), transforms.ToTensor(), transforms.Normalize(**NORM)]
)


def test_corrupt_images_are_skipped_and_listed(model, tmp_path):
    dataset = ImageFolderDataset(image_folder(tmp_path / "data"), PREPROCESS)
    assert dataset.class_to_idx == {"cat": 0, "dog": 1}
    assert [(p.name, label) for p, label in dataset.samples] == [
        ("0.png", 0),
        ("1.png", 0),
        ("truncated.jpg", 0),
        ("0.png", 1),
        ("1.png", 1),
        ("broken.png", 1),
    ]
    image, label = dataset[3]
    assert image.shape == (3, 32, 32) and label == 1
    with pytest.raises(UnreadableImageError, match=r"broken\.png"):
        dataset[5]
    report = run(
        model,
        dataset,
        ["class_space"],
        tmp_path / "out",
        protocols=["chefer2021/positive"],
    )
    assert sorted(Path(s["skipped"]).name for s in report.skipped) == [
        "broken.png",
        "truncated.jpg",
    ]
    assert report.n_images == 4 and report.rows[0].n_images == 4
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Unreadable images (skipped)" in markdown and "truncated.jpg" in markdown
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        ImageFolderDataset(tmp_path / "missing", PREPROCESS)


# ---------------------------------------------------------------------------- CLI
def test_benchmark_command(model, tmp_path, monkeypatch, capsys):
    class Preprocessing:
        mean, std, input_size = NORM["mean"], NORM["std"], (3, 32, 32)
        class_names = ("Dog", "bird", "Cat", "x", "y", "z", "w")

        def __call__(self, image):
            return PREPROCESS(image)

    models = types.ModuleType("class_space_saliency.models")
    models.load_model = lambda name, weights=None, **_: (copy.deepcopy(model), Preprocessing())
    models.EMBEDDED_MODELS, models.DEFAULT_MODEL = {"toy": None}, "toy"

    def load_default_eval(dataset=None, masks=False, preprocessing=None):
        images, labels = tiny_benchmark_data(4, model)
        return (
            (images, labels, torch.ones(4, 1, 32, 32, dtype=torch.bool).tril())
            if masks
            else (images, labels)
        )

    data = types.ModuleType("class_space_saliency.data")
    data.load_default_eval = load_default_eval
    monkeypatch.setitem(sys.modules, "class_space_saliency.models", models)
    monkeypatch.setitem(sys.modules, "class_space_saliency.data", data)
    parser = argparse.ArgumentParser()
    add_benchmark_command(parser.add_subparsers())
    defaults = parser.parse_args(["benchmark"])
    assert defaults.methods == [
        "class_space",
        "gradcam",
        "rollout",
        "chefer",
        "random",
        "sobel",
        "intensity",
    ]
    assert (defaults.protocols, defaults.num_images, defaults.model) == (
        CLI_PRESETS,
        1000,
        "default",
    )
    args = parser.parse_args(
        [
            "benchmark",
            "--methods",
            "class_space",
            "--protocols",
            "vilas2023/positive",
            "--num-images",
            "3",
            "--out",
            str(tmp_path / "a"),
            "--max-batch-size",
            "8",
            "--batch-size",
            "2",
        ]
    )
    assert args.func(args) == 0
    assert "clean accuracy" in capsys.readouterr().out
    config = load_config(tmp_path / "a")
    assert config["model"]["name"] == "toy"  # the embedded model's name, not "default"
    assert config["localisation"] == {"upsample": None}
    records = load_records(tmp_path / "a")  # the embedded set has masks: localisation too
    assert (
        sorted(r["protocol"] for r in records) == ["localisation"] * 3 + ["vilas2023/positive"] * 3
    )
    with pytest.raises(SystemExit) as exited:
        parser.parse_args(["benchmark", "--methods", "no_such_method"])
    assert exited.value.code == 2 and "no_such_method" in capsys.readouterr().err
    args = parser.parse_args(
        [
            "benchmark",
            "--data",
            str(image_folder(tmp_path / "img")),
            "--methods",
            "class_space",
            "--protocols",
            "chefer2021/negative",
            "--upsample",
            "nearest",
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert args.func(args) == 0
    assert load_config(tmp_path / "c")["protocols"][0]["upsample"] == "nearest"
    assert "truncated.jpg" in (tmp_path / "c" / "report.md").read_text()
    out = capsys.readouterr()
    records = load_records(tmp_path / "c")
    assert {r["label"] for r in records if "label" in r} <= {0, 2}  # Dog -> 0, Cat -> 2
    accuracy = float(out.out.split("clean accuracy ")[1].split()[0])
    assert ("below twice chance" in out.err) == (accuracy < 2 / 7)

    (tmp_path / "img" / "fish").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "img" / "fish" / "0.png")
    args = parser.parse_args(
        ["benchmark", "--data", str(tmp_path / "img"), "--out", str(tmp_path / "d")]
    )
    assert args.func(args) == 2
    assert "['fish']" in capsys.readouterr().err
    args = parser.parse_args(
        ["benchmark", "--data", str(tmp_path / "img"), "--labels-by-index", "--methods", "sobel",
         "--protocols", "chefer2021/negative", "--out", str(tmp_path / "e")]
    )  # fmt: skip
    assert args.func(args) == 0
    assert {r["label"] for r in load_records(tmp_path / "e") if "label" in r} == {0, 1, 2}
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("class_space_saliency.evaluation.cli.run_benchmark", interrupted)
    args = parser.parse_args(["benchmark", "--num-images", "3", "--out", str(tmp_path / "a")])
    assert args.func(args) == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "3 of 3 images are saved" in err and "resume" in err


def test_balanced_order_prefixes_are_class_balanced_and_grow():
    labels = [0] * 10 + [1] * 3 + [2] * 6
    order = balanced_order(labels, seed=4)
    assert sorted(order) == list(range(19)) and order == balanced_order(labels, seed=4)
    assert sorted(labels[i] for i in order[:6]) == [0, 0, 1, 1, 2, 2]
    assert order != balanced_order(labels, seed=5)
