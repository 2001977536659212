"""Runner and report: localisation from masks, ROAD records, missing methods, gzipped shards,
dataset fingerprints, batching independence and the CLI's --data rule."""

from __future__ import annotations

import argparse
import gzip
import shutil

import numpy as np
import pytest

from class_space_saliency import ClassSpaceSaliency, testing
from class_space_saliency.evaluation import (
    load_config,
    load_records,
    localisation,
    run_benchmark,
    summarize,
    write_report,
)
from class_space_saliency.evaluation.cli import add_benchmark_command
from class_space_saliency.testing import box_masks, tiny_benchmark_data

ROAD = ["road2022", "vilas2023/positive"]
NORM = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
QUICK = dict(batch_size=3, progress=False, n_boot=50)


@pytest.fixture(scope="module")
def model(shared_models):
    return shared_models.get(testing.tiny_vit, "plain")


def run(model, data, out_dir, methods=("class_space", "random"), protocols=ROAD, **kwargs):
    return run_benchmark(
        model,
        data,
        list(methods),
        protocols,
        **NORM,
        out_dir=out_dir,
        **{**QUICK, **kwargs},
    )


@pytest.fixture(scope="module")
def masked_run(model, tmp_path_factory):
    images, labels = tiny_benchmark_data(5, model)
    out_dir = tmp_path_factory.mktemp("masked")
    report = run(model, (images, labels, box_masks(images)), out_dir)
    return out_dir, report, (images, labels, box_masks(images))


def test_localisation_records_and_report(model, masked_run):
    out_dir, report, (images, labels, masks) = masked_run
    records = load_records(out_dir)
    found = [r for r in records if r["protocol"] == "localisation" and r["method"] == "class_space"]
    assert [r["image"] for r in found] == list(range(5))
    maps = ClassSpaceSaliency(model).attribute(images, target=labels)
    expected = localisation(maps, masks)  # the label's map
    for metric, values in expected.items():
        assert [r["localisation"][metric] for r in found] == pytest.approx(values.tolist())
    row = next(
        r
        for r in report.rows
        if r.protocol == "localisation/relevance_rank" and r.method == "random"
    )
    assert row.n_images == 5 and row.diff is not None and row.diff_low <= row.diff <= row.diff_high
    ours = np.mean([r["localisation"]["relevance_rank"] for r in found])
    assert next(
        r.auc
        for r in report.rows
        if r.protocol == "localisation/relevance_rank" and r.method == "class_space"
    ) == pytest.approx(ours)
    markdown = (out_dir / "report.md").read_text()
    assert "## localisation/mask_auroc (higher is better)" in markdown
    assert load_config(out_dir)["dataset"]["masks"] is True


def test_road_records_and_combined_row(masked_run):
    out_dir, report, _ = masked_run
    records = load_records(out_dir)
    morf = [r for r in records if r["protocol"] == "road2022/morf"]
    assert len(morf) == 10 and len(morf[0]["curve"]) == 9
    assert set(np.concatenate([r["extra_curves"]["accuracy"] for r in morf])) <= {0.0, 1.0}
    assert morf[0]["auc"] == pytest.approx(np.mean(morf[0]["curve"]))
    auc = {(r.protocol, r.method): r.auc for r in report.rows}
    for method in ("class_space", "random"):
        combined = (auc["road2022/lerf", method] - auc["road2022/morf", method]) / 2
        assert auc["road2022/combined", method] == pytest.approx(combined)
    assert "## road2022/combined (higher is better)" in (out_dir / "report.md").read_text()


def test_records_do_not_depend_on_batch_size(model, masked_run, tmp_path):
    out_dir, _, data = masked_run
    run(model, data, tmp_path, batch_size=2, max_batch_size=7)
    # maps of a batch of 2 and of 3 differ by float32 rounding (~1e-7): compare with a
    # tolerance far below what a different tie order or ROAD noise would change
    for ours, theirs in zip(load_records(tmp_path), load_records(out_dir), strict=True):
        assert ours.keys() == theirs.keys()
        for key, value in ours.items():
            if key == "localisation":
                assert value == pytest.approx(theirs[key], abs=1e-6)
            elif key in ("curve", "auc"):
                np.testing.assert_allclose(value, theirs[key], atol=1e-5)
            elif key == "extra_curves":
                assert value == theirs[key]
            else:
                assert value == theirs[key]


def test_missing_method_is_reported_not_dropped(masked_run):
    out_dir, _, _ = masked_run
    records = [
        r
        for r in load_records(out_dir)
        if not (r.get("method") == "random" and r.get("protocol") == "vilas2023/positive")
    ]
    report = summarize(records, load_config(out_dir), n_boot=20)
    assert ("vilas2023/positive", "random") in report.missing
    rows = [r for r in report.rows if r.protocol == "vilas2023/positive"]
    assert [r.method for r in rows] == ["class_space"]  # the protocol is still reported
    assert ("road2022/morf", "random") not in report.missing


def test_gzipped_shards_are_read_and_an_empty_folder_is_refused(masked_run, tmp_path):
    out_dir, report, _ = masked_run
    shutil.copy(out_dir / "config.json", tmp_path / "config.json")
    for shard in out_dir.glob("results.rank*.jsonl"):
        (tmp_path / f"{shard.name}.gz").write_bytes(gzip.compress(shard.read_bytes()))
    again = write_report(tmp_path, n_boot=QUICK["n_boot"])
    assert again.rows == report.rows
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(out_dir / "config.json", empty / "config.json")
    (empty / "report.md").write_text("earlier report")
    with pytest.raises(ValueError, match="no result records"):
        write_report(empty)
    assert (empty / "report.md").read_text() == "earlier report"


def test_config_fingerprints_the_data(model, tmp_path):
    images, labels = tiny_benchmark_data(3, model)
    run(
        model, (images, labels), tmp_path, protocols=["vilas2023/positive"], methods=["class_space"]
    )
    changed = images.clone()
    changed[0, 0, 0, 0] += 1.0  # same type, size and shape: only the contents differ
    with pytest.raises(ValueError, match=r"differs in \['dataset'\]"):
        run(
            model,
            (changed, labels),
            tmp_path,
            protocols=["vilas2023/positive"],
            methods=["class_space"],
        )
    with pytest.raises(ValueError, match=r"differs in \['dataset'\]"):
        run(
            model,
            (images, labels.flip(0)),
            tmp_path,
            protocols=["vilas2023/positive"],
            methods=["class_space"],
        )


def test_dataset_masks_are_checked(model):
    images, labels = tiny_benchmark_data(2, model)
    with pytest.raises(TypeError, match="masks must be a bool"):
        run(model, (images, labels, box_masks(images).float()), "unused")
    with pytest.raises(ValueError, match="masks must have shape"):
        run(model, (images, labels, box_masks(images)[:, :, :8]), "unused")
    with pytest.raises(ValueError, match="tuple"):
        run(model, (images,), "unused")


def test_cli_needs_data_for_a_model_that_is_not_embedded(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_benchmark_command(parser.add_subparsers())
    args = parser.parse_args(
        ["benchmark", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path)]
    )
    assert args.func(args) == 2
    error = capsys.readouterr().err
    assert "--data" in error and "vit_tiny_patch16_224" in error
    assert not any(tmp_path.iterdir())  # nothing was run
