"""Protocol fairness: the upsample knob, the official random baseline, verdicts that say how
sure they are (fragile, derived, correct images only) and runs that save every image."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from class_space_saliency import ClassSpaceSaliency, testing
from class_space_saliency.evaluation import (
    PROTOCOLS,
    load_config,
    load_records,
    perturbation_curves,
    run_benchmark,
    summarize,
)
from class_space_saliency.evaluation import runner as runner_module
from class_space_saliency.evaluation.protocols import SHARED_RANDOM, protocol_to_dict
from class_space_saliency.evaluation.report import (
    Section,
    is_fragile,
    verdict_counts,
    verdict_table,
)
from class_space_saliency.testing import tiny_benchmark_data

NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def model(shared_models):
    return shared_models.get(testing.tiny_vit, "plain")


# ---------------------------------------------------------------------------- upsample knob
def test_nearest_upsampling_removes_whole_patches_like_the_patch_unit(model):
    # 16 patches of 8 x 8 pixels: at fractions k / 16 the patch-aligned pixel order has
    # removed exactly the k most salient patches, which the patch unit does by its own code
    images, labels = tiny_benchmark_data(4, model)
    maps = ClassSpaceSaliency(model).attribute(images, labels)
    steps = tuple(k / 16 for k in range(16))
    pixel = dataclasses.replace(
        PROTOCOLS["rise2018/deletion"], steps=steps, upsample="nearest", score="logit"
    )
    patch = dataclasses.replace(pixel, unit="patch")
    _, by_pixel = perturbation_curves(model, images, maps, labels, pixel, **NORM)
    _, by_patch = perturbation_curves(model, images, maps, labels, patch, **NORM)
    torch.testing.assert_close(by_pixel, by_patch)
    bilinear = dataclasses.replace(pixel, upsample="bilinear")
    _, blended = perturbation_curves(model, images, maps, labels, bilinear, **NORM)
    assert not torch.allclose(blended, by_patch)  # the knob does change the pixel order


def test_new_knobs_are_validated_and_old_run_folders_resume(model, tmp_path):
    with pytest.raises(ValueError, match="upsample must be one of"):
        dataclasses.replace(PROTOCOLS["chefer2021/positive"], upsample="bicubic")
    with pytest.raises(ValueError, match="unit='token'"):
        dataclasses.replace(PROTOCOLS["chefer2021/positive"], shared_random_orders=2)
    with pytest.raises(ValueError, match="shared_random_orders"):
        dataclasses.replace(PROTOCOLS["vilas2023/positive"], shared_random_orders=-1)
    data = tiny_benchmark_data(3, model)
    kwargs = dict(progress=False, n_boot=20, out_dir=tmp_path, **NORM)
    run_benchmark(model, data, ["sobel"], ["chefer2021/positive"], **kwargs)
    config = load_config(tmp_path)
    assert config["protocols"][0]["upsample"] == "bilinear"  # recorded
    for knobs in config["protocols"]:  # a folder written before the knobs existed
        del knobs["upsample"], knobs["shared_random_orders"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    before = load_records(tmp_path)
    run_benchmark(model, data, ["sobel"], ["chefer2021/positive"], **kwargs)
    assert load_records(tmp_path) == before  # resumed: nothing left to do
    nearest = dataclasses.replace(PROTOCOLS["chefer2021/positive"], upsample="nearest")
    with pytest.raises(ValueError, match="differs in"):
        run_benchmark(model, data, ["sobel"], [nearest], **kwargs)


# ------------------------------------------------------------- the official random baseline
def kept_token_accuracy(model, images, labels, kept: list[int]) -> torch.Tensor:
    """Top-1 accuracy per image with only the image tokens ``kept``, by timm's parts."""
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        prefix = model.num_prefix_tokens
        tokens = torch.cat([tokens[:, :prefix], tokens[:, prefix:][:, sorted(kept)]], 1)
        logits = model.forward_head(model.norm(model.blocks(tokens)))
    return (logits.argmax(-1) == labels).float()


def test_shared_random_orders_by_hand(model, tmp_path):
    orders = 3
    images, labels = tiny_benchmark_data(5, model)
    count = 16  # image tokens of the tiny ViT
    curves = torch.zeros(5, count - 1)
    for seed in range(orders):
        with torch.random.fork_rng():  # the official code seeds the global generator
            permutation = torch.randperm(count, generator=torch.manual_seed(seed)).tolist()
        for step, kept in enumerate(range(count - 1, 0, -1)):  # 1, 2, ... tokens removed
            curves[:, step] += kept_token_accuracy(model, images, labels, permutation[:kept])
    curves /= orders
    mean_curve = curves.mean(0).numpy()
    expected_auc = mean_curve.sum() / (mean_curve.max() * count)

    protocols = [
        dataclasses.replace(PROTOCOLS[f"vilas2023/{order}"], shared_random_orders=orders)
        for order in ("positive", "negative")
    ]
    report = run_benchmark(
        model, (images, labels), ["random"], protocols, **NORM, out_dir=tmp_path,
        progress=False, n_boot=20,
    )  # fmt: skip
    for protocol in protocols:
        found = [
            r["curve"]
            for r in load_records(tmp_path)
            if r["method"] == SHARED_RANDOM and r["protocol"] == protocol.name
        ]
        np.testing.assert_allclose(found, curves.numpy(), atol=1e-6)
        rows = {(r.protocol, r.method): r for r in report.rows}
        row = rows[protocol.name, SHARED_RANDOM]
        assert row.auc == pytest.approx(expected_auc)  # equal for both orders
    assert not report.missing
    with pytest.raises(ValueError, match="random_shared"):
        run_benchmark(
            model, (images, labels), {SHARED_RANDOM: ClassSpaceSaliency(model)}, protocols,
            **NORM, out_dir=tmp_path / "clash", progress=False,
        )  # fmt: skip


# ---------------------------------------------------------------------------- verdicts
UP = Section("localisation/pointing_game", True, "mean")
PERCENT = Section("chefer2021/positive", False, "trapezoid_percent")


def test_fragile_means_near_zero_or_seed_dependent():
    assert not is_fragile(UP, (0.01, 0.05), (0.011, 0.049))
    assert is_fragile(UP, (0.01, 0.05), (-0.001, 0.049))  # worse, then tie: flips
    assert is_fragile(UP, (0.0015, 0.05), (0.0016, 0.05))  # ends 0.0015 from zero
    assert not is_fragile(UP, (-0.0015, 0.05), (-0.0016, 0.05))  # a tie either way
    assert not is_fragile(PERCENT, (-3.0, -0.25), (-3.1, -0.24))  # 0.2 on the percent scale
    assert is_fragile(PERCENT, (-3.0, -0.15), (-3.1, -0.16))


def localisation_records(differences: dict[str, list[float]], correct: list[bool]) -> list:
    """Pointing-game records: class_space 0.5 per image, each method 0.5 - difference."""
    records = []
    for method, values in {"class_space": [0.0] * len(correct), **differences}.items():
        for image, (difference, right) in enumerate(zip(values, correct, strict=True)):
            records.append(
                {
                    "image": image,
                    "method": method,
                    "protocol": "localisation",
                    "label": 0,
                    "prediction": 0 if right else 1,
                    "target": 0,
                    "localisation": {"pointing_game": 0.5 - difference},
                }
            )
    return records


def test_verdicts_fragile_cells_and_counts_by_hand():
    n = 40
    differences = {
        "far": [0.1] * n,  # class_space always 0.1 higher: worse, robustly
        "near": [0.0015] * n,  # interval [0.0015, 0.0015]: worse, but within the margin
        "even": [0.1, -0.1] * (n // 2),  # differences cancel: tie
    }
    config = {
        "n": n,
        "seed": 0,
        "model": {"name": "toy", "fingerprint": "0"},
        "dataset": {"masks": True},
        "methods": [{"name": m} for m in ("class_space", *differences)],
        "protocols": [],
    }
    records = localisation_records(differences, [True] * n)
    report = summarize(records, config, n_boot=200)
    rows = {r.method: r for r in report.rows if r.protocol == "localisation/pointing_game"}
    assert (rows["far"].verdict, rows["far"].fragile) == ("worse", False)
    assert (rows["near"].verdict, rows["near"].fragile) == ("worse", True)
    assert (rows["even"].verdict, rows["even"].fragile) == ("tie", False)
    assert rows["far"].gain(True) == pytest.approx((-0.1, -0.1, -0.1))  # negative: worse
    assert rows["class_space"].verdict is None
    assert verdict_table(report, "class_space")[2:5] == [
        "| far | worse | 0 / 0 / 1 / 0 |",
        "| near | (worse) | 0 / 0 / 0 / 1 |",  # fragile: shown, not counted as worse
        "| even | tie | 0 / 1 / 0 / 0 |",
    ]
    assert verdict_counts([rows["far"], rows["near"], rows["even"]]) == "0 / 1 / 1 / 1"


def road_records(levels: dict[str, tuple[float, float]], correct: list[bool]) -> list:
    """ROAD records with constant curves: (MoRF level, LeRF level) per method."""
    records = []
    for method, (morf, lerf) in levels.items():
        for image, right in enumerate(correct):
            shift = 0.01 * image  # images differ, methods differ by the same amount
            for protocol, level in (("road2022/morf", morf), ("road2022/lerf", lerf)):
                records.append(
                    {
                        "image": image,
                        "method": method,
                        "protocol": protocol,
                        "label": 0,
                        "prediction": 0 if right else 1,
                        "target": 0,
                        "curve": [level + shift] * 9,
                        "auc": level + shift,
                    }
                )
    return records


def test_derived_columns_are_not_counted_and_correct_images_stand_apart():
    correct = [True, False, True, True, False, True]
    levels = {"class_space": (0.3, 0.7), "worse": (0.5, 0.6)}
    config = {
        "n": 6,
        "seed": 3,
        "model": {"name": "toy", "fingerprint": "0"},
        "methods": [{"name": "class_space"}, {"name": "worse"}],
        "protocols": [protocol_to_dict(PROTOCOLS[f"road2022/{c}"]) for c in ("morf", "lerf")],
    }
    records = road_records(levels, correct)
    report = summarize(records, config, n_boot=100)
    combined = next(s for s in report.sections if s.name == "road2022/combined")
    assert combined.derived and not any(s.derived for s in report.sections if s is not combined)
    table = verdict_table(report, "class_space")
    assert table[0].endswith("| road2022/combined ↑ (derived) | better / tie / worse / fragile |")
    assert table[2] == "| worse | worse | worse | worse | 0 / 0 / 2 / 0 |"
    only = summarize(records, config, n_boot=100, subset="correct")
    assert only.n_images == 4 and report.n_images == 6
    assert only.clean_accuracy == report.clean_accuracy == pytest.approx(4 / 6)
    morf = next(r for r in only.rows if (r.protocol, r.method) == ("road2022/morf", "worse"))
    shifts = [0.01 * i for i, right in enumerate(correct) if right]
    assert morf.auc == pytest.approx(0.5 + np.mean(shifts))
    with pytest.raises(ValueError, match="subset"):
        summarize(records, config, subset="wrong")


# ---------------------------------------------------------------------------- long runs
class Counting:
    """Wraps a method; counts calls and raises KeyboardInterrupt on call ``stop_at``."""

    def __init__(self, method, stop_at: int | None = None) -> None:
        self.method, self.stop_at, self.calls = method, stop_at, 0

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        return self.method.attribute(inputs, target)


def test_an_interrupted_run_keeps_every_finished_image(model, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "CHUNK_SECONDS", 0.0)  # one image per chunk
    data = tiny_benchmark_data(5, model)
    method = Counting(ClassSpaceSaliency(model), stop_at=3)  # one call per image here
    kwargs = dict(out_dir=tmp_path, progress=False, n_boot=20, **NORM)
    with pytest.raises(KeyboardInterrupt):
        run_benchmark(model, data, {"cs": method}, ["vilas2023/positive"], **kwargs)
    assert [r["image"] for r in load_records(tmp_path)] == [0, 1]
    method.stop_at = None
    run_benchmark(model, data, {"cs": method}, ["vilas2023/positive"], **kwargs)
    assert [r["image"] for r in load_records(tmp_path)] == [0, 1, 2, 3, 4]


def test_chunks_grow_once_images_prove_fast(model, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_module, "CHUNK_SECONDS", 1e9)
    data = tiny_benchmark_data(7, model)
    method = Counting(ClassSpaceSaliency(model))
    run_benchmark(
        model, data, {"cs": method}, ["vilas2023/positive"], out_dir=tmp_path, progress=False,
        **NORM,
    )  # fmt: skip
    assert method.calls == 2  # the first image alone, then the other six together


def test_the_estimate_is_one_line_on_stderr(model, tmp_path, capsys):
    run_benchmark(
        model, tiny_benchmark_data(3, model), ["sobel"], ["vilas2023/positive"],
        out_dir=tmp_path, n_boot=20, **NORM,
    )  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if "first image" in line]
    assert len(lines) == 1
    assert "the first image took" in lines[0] and "for the other 2" in lines[0]
