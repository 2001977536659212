"""The paper's attention knock-outs and a patching grid on the embedded fashion-scenes model.

- ``attention_knockout``: identifiability of the image tokens per block, unperturbed and with
  ``"self_only"`` and ``"no_cls"`` in every block (the paper's setting), on the 1,000
  embedded evaluation images; and ``"no_cls"`` with renormalised rows.
- ``patching_grid``: the first ``--pairs`` evaluation images (clean) each paired with the
  next image of another class (corrupted); metric: the clean label's logit.

Writes ``{json,md,png}`` files to ``benchmarks/results/interventions/`` (``--out``).

Example:
    python benchmarks/intervention_figures.py   # ~5 min on an idle 2-core CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from class_space_saliency import analysis, data, models


def other_class_partners(labels: torch.Tensor) -> torch.Tensor:
    """For each image, the index of the next image (cyclically) with another label."""
    n = len(labels)
    partners = []
    for i in range(n):
        j = next(k % n for k in range(i + 1, i + n) if labels[k % n] != labels[i])
        partners.append(j)
    return torch.tensor(partners)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "interventions"
    )
    args = parser.parse_args()
    model, _ = models.load_default()
    images, labels = data.load_default_eval(args.images)

    knocked = analysis.attention_knockout(model, (images, labels), components=("residual",))
    knocked.save(args.out, "attention_knockout_fashion-scenes")
    print(knocked.table())
    renormalised = analysis.attention_knockout(
        model, (images, labels), modes="no_cls", renormalise=True
    )
    renormalised.save(args.out, "attention_knockout_no_cls_renormalised_fashion-scenes")
    print(renormalised.table())

    clean, clean_labels = images[: args.pairs], labels[: args.pairs]
    corrupted = images[other_class_partners(labels)[: args.pairs]]
    patched = analysis.patching_grid(model, (clean, clean_labels), corrupted)
    patched.save(args.out, "patching_fashion-scenes")
    figure = patched.plot(token_layout="grid")
    figure.savefig(args.out / "patching_fashion-scenes_token_grid.png", dpi=150)
    print(patched.table())


if __name__ == "__main__":
    main()
