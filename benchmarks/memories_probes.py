"""Memories and linear probes (Vilas et al. 2023, Sec. 5-6) on an embedded model.

Runs on the model's embedded evaluation images (the first ``--num-images`` of 1,000):

- ``value_vectors``: class-value agreement per block, against the same architecture
  untrained (timm's initialisation, seed 0), with the one-sided Wilcoxon test per block;
- ``value_vector_classes``: the last block's MLP and attention memories and their classes;
- ``key_value_agreement``: agreement, random-class control, [CLS] on correct vs wrong
  images, compositionality (top-5 memories, pre-activation MLP keys as the official code);
- ``linear_probes``: ridge probes per block, component and token position (and pooled)
  fitted on ``--train-images`` composites that are not evaluation images, scored beside the
  class-space projection on the evaluation images, with the data-efficiency curve;
- ``per_head_maps.png``: the paper's gradient map of the last block per head.

Training images for the probes: the embedded evaluation sets are test-split images 0..999
(fashion-scenes: composites with seed 0 on the held-out photos; fashion: Fashion-MNIST test
images), so the probes are fitted on test-split images from index 1,000 on: other objects,
the same distribution, never seen in the model's training.

Writes ``<out>/memories_probes_<model>/``: each result's ``.json``, ``.md`` and ``.png``,
``linear_probes.pt`` (for ``faithfulness.py --probes``) and ``summary.json`` (timings).

Example:
    python benchmarks/memories_probes.py --model fashion-scenes --train-images 3000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import timm
import torch

from class_space_saliency import analysis
from class_space_saliency.data import (
    load_default_eval,
    load_default_eval_uint8,
    load_default_held_out,
)
from class_space_saliency.methods import ClassSpaceAttentionGradient
from class_space_saliency.models import EMBEDDED_MODELS, load_default
from class_space_saliency.visualize import saliency_grid, save_figure

CURVE = (1, 2, 5, 10, 20, 50, 100, 200)
"""Training images per class of the data-efficiency curve."""


def untrained(model_name: str, seed: int = 0) -> torch.nn.Module:
    """The embedded model's architecture with timm's random initialisation."""
    config = json.loads(EMBEDDED_MODELS[model_name].read_text())
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **config["kwargs"]).eval()


def timed(results: dict, name: str, call):
    start = time.perf_counter()
    value = call()
    results[name] = round(time.perf_counter() - start, 2)
    print(f"{name}: {results[name]:.1f} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(EMBEDDED_MODELS), default="fashion-scenes")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()

    folder = args.out / f"memories_probes_{args.model.replace('-', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    model, prep = load_default(args.model)
    images, labels = load_default_eval(args.num_images, dataset=args.model, preprocessing=prep)
    evaluation = (images, labels)
    seconds: dict[str, float] = {}
    options = dict(batch_size=args.batch_size, progress=False)

    values = timed(seconds, "value_vectors", lambda: analysis.value_vectors(
        model, baseline=untrained(args.model)))  # fmt: skip
    values.save(folder)
    for component in ("mlp", "attention"):
        classes = analysis.value_vector_classes(
            model, -1, component, k=3, class_names=prep.class_names
        )
        classes.save(folder, f"value_vector_classes_{component}")
    agreement = timed(seconds, "key_value_agreement", lambda: analysis.key_value_agreement(
        model, evaluation, **options))  # fmt: skip
    agreement.save(folder)
    train = timed(seconds, "generate_training_images", lambda: load_default_held_out(
        args.train_images, args.model, prep))  # fmt: skip
    probes = timed(seconds, "linear_probes", lambda: analysis.linear_probes(
        model, train, evaluation, curve=CURVE, **options))  # fmt: skip
    probes.save(folder)

    raw, raw_labels = load_default_eval_uint8(8, dataset=args.model)
    heads = ClassSpaceAttentionGradient(model).attribute(
        images[:8], labels[:8], layer=-1, per_head=True
    )[:, 0]  # (8, H, h, w): the last block's heads
    titles = [prep.class_name(int(c)) for c in raw_labels]
    columns = {f"head {h}": heads[:, h] for h in range(heads.shape[1])}
    save_figure(saliency_grid(raw, columns, titles), folder / "per_head_maps.png")

    summary = dict(
        model=args.model,
        num_images=len(labels),
        train_images=probes.num_train,
        train_per_class=probes.train_per_class.tolist(),
        seconds={**seconds, "probes_fit": round(probes.fit_seconds, 2)},
        threads=torch.get_num_threads(),
    )
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for result in (values, agreement, probes):
        print(result.table(), end="\n\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
