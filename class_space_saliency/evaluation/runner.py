"""The benchmark runner: methods x protocols over a dataset, resumable and shardable.

:func:`run_benchmark` evaluates images in chunks: one clean forward (prediction), each
method's maps once per image (per class the protocols ask for), then every protocol's curves
of all methods at once (an input several methods share goes through the model once).
Records are appended to the run folder's JSONL store after every chunk, so a killed run
resumes where it stopped. By default a chunk is one image until images prove fast, then as
many as take about :data:`CHUNK_SECONDS` (an interruption loses at most one chunk); records do
not depend on the chunking. Under ``torchrun`` each rank takes every ``world_size``-th image
and writes its own shard; rank 0 writes the report once all ranks are done.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol as TypingProtocol

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .._fingerprint import model_fingerprint
from .._validation import check_choice
from ..adapters import find_token_path
from ..adapters.hf import hf_logits
from ..methods import create_method
from .curves import (
    area_under_curve,
    check_token_model,
    perturbation_scores,
    shared_random_order_maps,
)
from .datasets import UnreadableImageError, as_dataset, dataset_fingerprint, has_masks
from .distributed import shard_from_env
from .localisation import LOCALISATION_UPSAMPLE, localisation
from .protocols import SHARED_RANDOM, PerturbationProtocol, protocol_to_dict, resolve_protocols
from .report import BenchmarkReport, write_report
from .store import LOCALISATION, ResultStore, load_records, record_key


class Attributor(TypingProtocol):
    """Anything with a saliency method's ``attribute(inputs, target)`` -> (B, 1, h, w)."""

    def attribute(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


def build_methods(
    model: nn.Module,
    methods: Sequence[str] | Mapping[str, Attributor],
    method_kwargs: Mapping[str, Mapping] | None = None,
) -> tuple[dict[str, Attributor], list[dict]]:
    """Instantiate registry methods by name (or take ready ones) and describe them.

    Args:
        model: The model to explain.
        methods: Registry names (``create_method``) or a mapping name -> method object.
        method_kwargs: Constructor options per registry name.

    Returns:
        ``(methods by name, descriptions for the run config)``.
    """
    method_kwargs = dict(method_kwargs or {})
    if isinstance(methods, Mapping):
        built = dict(methods)
        described = [{"name": name, "class": type(m).__qualname__} for name, m in built.items()]
    else:
        names = [methods] if isinstance(methods, str) else list(methods)
        if len(set(names)) != len(names):
            raise ValueError(f"method names must be unique, got {names}")
        built = {name: create_method(name, model, **method_kwargs.get(name, {})) for name in names}
        described = [{"name": name, "kwargs": dict(method_kwargs.get(name, {}))} for name in names]
    unknown = set(method_kwargs) - set(built)
    if unknown:
        raise ValueError(f"method_kwargs given for methods not run: {sorted(unknown)}")
    if not built:
        raise ValueError("no methods given")
    return built, described


def _stored(store: ResultStore) -> dict:
    return json.loads(store.config_path.read_text())


def _model_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), torch.empty(0))
    return tensor.device


def _channel_mean(dataset: Dataset, indices: Sequence[int]) -> torch.Tensor:
    """Per-channel mean (C,) of the readable images among ``indices``."""
    total, count = None, 0
    for index in indices:
        try:
            image = dataset[index][0]
        except UnreadableImageError:
            continue
        sums = image.double().flatten(1).sum(1)
        total = sums if total is None else total + sums
        count += image[0].numel()
    if total is None:
        raise ValueError("no readable images for the 'mean' baseline")
    return (total / count).float()


def _shared_random_scores(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    protocol: PerturbationProtocol,
    curve_options: dict,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Curves of the official random baseline: per image, the mean over the shared orders."""
    path = find_token_path(model)
    count = path.embed(images[:1]).shape[1] - path.num_prefix_tokens
    orders = protocol.shared_random_orders
    maps = shared_random_order_maps((1, count), orders, protocol.order, images.device)
    batch = images.shape[0]
    x, scores = perturbation_scores(
        model,
        images.repeat(orders, *([1] * (images.dim() - 1))),
        maps.repeat_interleave(batch, 0),
        targets.repeat(orders),
        protocol,
        **curve_options,
    )
    return x, {name: c.view(orders, batch, -1).mean(0) for name, c in scores.items()}


def _evaluate_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    masks: torch.Tensor | None,
    indices: Sequence[int],
    methods: Mapping[str, Attributor],
    protocols: Sequence[PerturbationProtocol],
    curve_options: dict,
    localisation_upsample: str | None = None,
) -> list[dict]:
    """Records of every method x protocol (and localisation, given masks) for one batch.

    ``curve_options`` are the keyword arguments of :func:`perturbation_curves` (mean, std,
    max_batch_size, dataset_mean). Localisation scores the map of the label. Protocols with
    ``shared_random_orders`` add records of the method :data:`SHARED_RANDOM`.
    """
    with torch.no_grad():
        predictions = hf_logits(model(images)).argmax(-1)
    classes = {"label": labels, "predicted": predictions}
    needed = dict.fromkeys(p.map_class for p in protocols)
    if masks is not None:
        needed["label"] = None
    records = []

    def record(row: int, name: str, protocol: str, target: torch.Tensor, **values) -> dict:
        return {
            "image": indices[row],
            "method": name,
            "protocol": protocol,
            "label": int(labels[row]),
            "prediction": int(predictions[row]),
            "target": int(target[row]),
            **values,
        }

    # one map per method and class the protocols (and localisation) ask for; each protocol
    # then runs the maps of all methods (of one map grid) in one call, the images repeated per
    # method, so inputs that several methods share go through the model once
    maps = {
        name: {c: method.attribute(images, target=classes[c]) for c in needed}
        for name, method in methods.items()
    }
    curves = {}
    for protocol in protocols:
        grids: dict[tuple, list[str]] = {}
        for name in methods:
            grids.setdefault(tuple(maps[name][protocol.map_class].shape), []).append(name)
        for names in grids.values():
            x, scores = perturbation_scores(
                model,
                images.repeat(len(names), *([1] * (images.dim() - 1))),
                torch.cat([maps[name][protocol.map_class].to(images.device) for name in names]),
                classes[protocol.score_class].repeat(len(names)),
                protocol,
                **curve_options,
            )
            for position, name in enumerate(names):
                part = slice(position * len(indices), (position + 1) * len(indices))
                curves[name, protocol] = (x, {s: values[part] for s, values in scores.items()})
        if protocol.shared_random_orders:
            targets = classes[protocol.score_class]
            curves[SHARED_RANDOM, protocol] = _shared_random_scores(
                model, images, targets, protocol, curve_options
            )
    for (name, protocol), (x, scores) in curves.items():
        target = classes[protocol.map_class]
        aucs = area_under_curve(scores[protocol.score].numpy(), x, protocol.auc)
        for row in range(len(indices)):
            extra = {s: scores[s][row].tolist() for s in protocol.extra_scores}
            records.append(
                record(
                    row,
                    name,
                    protocol.name,
                    target,
                    auc=float(aucs[row]),
                    curve=scores[protocol.score][row].tolist(),
                    **({"extra_curves": extra} if extra else {}),
                )
            )
    if masks is not None:
        for name in methods:
            scores = localisation(maps[name]["label"], masks, upsample=localisation_upsample)
            for row in range(len(indices)):
                values = {metric: float(value[row]) for metric, value in scores.items()}
                records.append(record(row, name, LOCALISATION, labels, localisation=values))
    return records


def _load_batch(dataset: Dataset, indices: Sequence[int], device: torch.device) -> tuple:
    """``(images, labels, masks or None, readable indices, skip records)`` of ``indices``.

    ``images`` and ``labels`` are ``None`` when no image of ``indices`` is readable.
    """
    images, labels, masks, readable, skipped = [], [], [], [], []
    for index in indices:
        try:
            item = dataset[index]
        except UnreadableImageError as error:
            skipped.append({"image": index, "skipped": error.path, "reason": error.reason})
            continue
        images.append(item[0])
        labels.append(int(item[1]))
        if len(item) > 2:
            masks.append(item[2])
        readable.append(index)
    if not images:
        return None, None, None, readable, skipped
    return (
        torch.stack(images).to(device),
        torch.tensor(labels, device=device),
        torch.stack(masks).to(device) if masks else None,
        readable,
        skipped,
    )


CHUNK_SECONDS = 10.0
"""Default chunking: a chunk holds as many images as take about this long (at least one).

Every chunk pays a fixed cost (token removal runs one forward per kept length, whatever the
chunk's size): on the embedded model with 2 CPU threads, one image per chunk took 1.41x the
time per image of chunks of 8; chunks of about 10 s hold about 14 images there."""
MAX_CHUNK = 64
"""The most images a default chunk holds."""


def next_chunk_size(seconds_per_image: float) -> int:
    """Images in the next default chunk, from the seconds per image measured so far.

    Example:
        >>> next_chunk_size(12.0), next_chunk_size(0.5), next_chunk_size(0.0001)
        (1, 20, 64)
    """
    if seconds_per_image <= 0:
        return MAX_CHUNK
    return max(1, min(MAX_CHUNK, int(CHUNK_SECONDS / seconds_per_image)))


def _duration(seconds: float) -> str:
    """``seconds`` in words: ``"45 s"``, ``"12 min"``, ``"2.5 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_benchmark(
    model: nn.Module,
    dataset: Dataset | tuple[torch.Tensor, ...],
    methods: Sequence[str] | Mapping[str, Attributor],
    protocols: Sequence[str | PerturbationProtocol],
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | Path,
    *,
    max_batch_size: int = 256,
    batch_size: int | None = None,
    n: int | None = None,
    seed: int = 0,
    progress: bool = True,
    method_kwargs: Mapping[str, Mapping] | None = None,
    model_name: str | None = None,
    n_boot: int = 1000,
    localisation_upsample: str | None = None,
) -> BenchmarkReport | None:
    """Run the faithfulness benchmark and write its records and report to ``out_dir``.

    One record per image x method x protocol (curve, AUC, map class, prediction, label) is
    appended to ``out_dir/results.rank{r}.jsonl`` after every chunk of images; for a dataset
    with masks, one more per image x method with the localisation scores of the label's map
    (protocol ``"localisation"``, see :func:`~class_space_saliency.evaluation.localisation`).
    Rerunning with the same arguments resumes: finished records are skipped and a cut-short
    last line is dropped. Under ``torchrun --nproc_per_node K`` the images are sharded over
    the ranks. With ``progress``, the time the first image took and the estimated time of the
    rest are printed as one line on stderr, and a progress bar counts images.

    Args:
        model: The classifier, on the device to run on.
        dataset: Items ``(normalised image (C, H, W), label)`` or, where the dataset's
            ``has_masks`` is True, ``(image, label, bool mask (1, H, W))``; or an
            ``(images, labels[, masks])`` tensor tuple. :class:`UnreadableImageError` items
            are skipped and listed in the report.
        methods: Registry names (see ``create_method``) or a mapping name -> object with
            ``attribute(inputs, target)``.
        protocols: Preset names (``"chefer2021"``), curve names (``"rise2018/deletion"``)
            or :class:`PerturbationProtocol` objects.
        mean: Per-channel mean of the model's normalisation.
        std: Per-channel std of the model's normalisation.
        out_dir: Run folder; a folder holding another configuration raises ``ValueError``.
        max_batch_size: Perturbed inputs per forward pass.
        batch_size: Images per chunk (the unit of computing together, flushing and
            resuming). ``None`` (default): the first chunk is one image (its time gives the
            estimate), each next one as many images as took about :data:`CHUNK_SECONDS` so
            far (at least one, at most :data:`MAX_CHUNK`): an interruption loses at most
            about that much work (one image where images are slower), and the chunks stay
            large enough to batch efficiently.
        n: Evaluate the first ``n`` images (default: all).
        seed: Seed of the report's bootstrap (recorded in the config).
        progress: Show the estimate and a progress bar (rank 0).
        method_kwargs: Constructor options per registry method name.
        model_name: Name recorded in the config (default: the model's class name).
        n_boot: Bootstrap resamples for the report's intervals.
        localisation_upsample: How localisation compares maps with masks (recorded in the
            config): ``None`` (default) at the map's own resolution, by each cell's mask
            share; ``"bilinear"`` or ``"nearest"``: per pixel of the upsampled map.

    Returns:
        The report on rank 0, ``None`` on other ranks.

    Raises:
        ValueError: For unknown methods/protocols, a bad ``n`` or batch size, or a config
            mismatch with ``out_dir``.
        TypeError: For token protocols on a model without token removal support.

    Example:
        >>> report = run_benchmark(model, (images, labels), ["class_space", "random"],
        ...     ["chefer2021", "vilas2023"], mean=(0.5,) * 3, std=(0.5,) * 3, out_dir="runs/a",
        ...     progress=False)
        >>> report.clean_accuracy  # labels: the model's own predictions
        1.0
    """
    if (batch_size is not None and batch_size < 1) or max_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {max_batch_size}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int or None (all images), got {n!r}")
    check_choice("localisation_upsample", localisation_upsample, LOCALISATION_UPSAMPLE)
    protocols = resolve_protocols(protocols)
    if any(p.unit == "token" for p in protocols):
        check_token_model(model)
    dataset = as_dataset(dataset)
    n_images = len(dataset) if n is None else min(int(n), len(dataset))
    device = _model_device(model)
    built, described = build_methods(model, methods, method_kwargs)
    baselines = [p.name for p in protocols if p.shared_random_orders]
    if baselines and SHARED_RANDOM in built:
        raise ValueError(
            f"the method name {SHARED_RANDOM!r} is taken by the official random baseline of "
            f"{baselines} (shared_random_orders): rename the method"
        )
    masked = has_masks(dataset)
    config = {
        "format": 2,
        "model": {
            "name": model_name or type(model).__name__,
            "fingerprint": model_fingerprint(model),
        },
        "dataset": {
            "type": type(dataset).__name__,
            "size": len(dataset),
            "fingerprint": dataset_fingerprint(dataset, len(dataset)),
            "masks": masked,
        },
        "n": n_images,
        "seed": seed,
        "mean": list(mean),
        "std": list(std),
        "methods": described,
        "protocols": [protocol_to_dict(p) for p in protocols],
    }
    if masked:
        config["localisation"] = {"upsample": localisation_upsample}
    wanted = [(name, p.name) for name in built for p in protocols]
    wanted += [(SHARED_RANDOM, name) for name in baselines]
    if masked:
        wanted += [(name, LOCALISATION) for name in built]

    with shard_from_env(device) as shard:
        store = ResultStore(out_dir, shard.rank)
        merged = store.check_config(config)
        shard.barrier()  # every rank has checked before rank 0 writes
        if shard.rank == 0 and (not store.config_path.exists() or merged != _stored(store)):
            store.write_config(merged)
        store.repair()
        done = {record_key(r) for r in load_records(out_dir)}
        talk = progress and shard.rank == 0
        if done and talk:
            finished = sum(all((i, *w) in done for w in wanted) for i in range(n_images))
            skipped = len({r[0] for r in done if r[1] is None and r[0] < n_images})
            print(
                f"resuming {out_dir}: {finished} of {n_images} images already done for every "
                f"method and protocol asked, {skipped} unreadable; computing the rest",
                file=sys.stderr,
            )
        curve_options = dict(
            mean=tuple(mean),
            std=tuple(std),
            max_batch_size=max_batch_size,
            dataset_mean=(
                _channel_mean(dataset, range(n_images))
                if any(p.baseline == "mean" for p in protocols)
                else None
            ),
        )
        indices = list(range(n_images))[shard.rank :: shard.world_size]
        pending = [
            i
            for i in indices
            if (i, None, None) not in done and any((i, *w) not in done for w in wanted)
        ]
        training = {module: module.training for module in model.modules()}
        model.eval()
        bar = tqdm(
            total=len(indices),
            initial=len(indices) - len(pending),
            unit="img",
            disable=not talk,
        )
        try:
            chunk, position, elapsed = batch_size or 1, 0, 0.0
            while position < len(pending):
                batch = pending[position : position + chunk]
                started = time.perf_counter()
                images, labels, masks, readable, skipped = _load_batch(dataset, batch, device)
                records = skipped
                if readable:
                    records += _evaluate_batch(
                        model,
                        images,
                        labels,
                        masks,
                        readable,
                        built,
                        protocols,
                        curve_options,
                        localisation_upsample,
                    )
                store.append(r for r in records if record_key(r) not in done)
                seconds = time.perf_counter() - started
                if position == 0 and talk and len(pending) > len(batch):
                    rest = len(pending) - len(batch)
                    bar.write(
                        f"the first {'image' if len(batch) == 1 else f'{len(batch)} images'} "
                        f"took {_duration(seconds)}: about {_duration(seconds / len(batch) * rest)}"
                        f" for the other {rest} (an estimate; the progress bar refines it)",
                        file=sys.stderr,
                    )
                position += len(batch)
                elapsed += seconds
                bar.update(len(batch))
                if batch_size is None:
                    chunk = next_chunk_size(elapsed / position)
        finally:
            bar.close()
            for module, flag in training.items():
                module.training = flag
        shard.barrier()
        if shard.rank != 0:
            return None
        return write_report(out_dir, n_boot=n_boot, seed=seed)
