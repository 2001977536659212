"""Which tokens does each map rank where? The audit's table, by octile of every map's ranking.

For every method on an embedded model, each image's image tokens are ranked by the method's
map of the label (most important first; ties broken by the image-seeded shuffle of the
perturbation protocols) and cut into eight octiles. Per octile (1 = the top eighth):

- ``object`` / ``edge`` / ``background``: share of tokens whose patch lies wholly inside the
  object mask, partly (0 < share of pixels < 1), or wholly outside it;
- ``own top-1 = label``: share of tokens whose own last-block class-space projection puts the
  label first;
- ``[CLS] attention``: share of the last block's [CLS] -> image-token attention (mean over
  heads) that falls on the octile's tokens (12.5 % for a random octile);
- ``logit drop``: the label logit of the clean image minus the label logit with the octile's
  tokens removed from the sequence after the position embeddings (as ``vilas2023``);
  the larger, the more the prediction reads from them.

A faithful ranking puts the tokens the prediction reads (large drop, large [CLS] attention)
in the first octiles and the ones it ignores in the last. Results:
``benchmarks/results/diagnose_ranking_<model>.{json,md}``.

Example:
    python benchmarks/diagnose_ranking.py --model fashion-scenes --num-images 1000 \
        --probes benchmarks/results/memories_probes_fashion_scenes/linear_probes.pt
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from class_space_saliency import ViTAnatomy
from class_space_saliency.adapters import find_token_path
from class_space_saliency.data import load_default_eval
from class_space_saliency.evaluation.curves import perturbation_ranks
from class_space_saliency.methods import create_method, list_methods
from class_space_saliency.models import load_default
from class_space_saliency.probing import LinearProbes
from class_space_saliency.projection import target_class_column

OCTILES = 8
COLUMNS = ("object", "edge", "background", "own top-1 = label", "[CLS] attention", "logit drop")


@torch.no_grad()
def token_facts(model, images, labels, masks) -> dict[str, torch.Tensor]:
    """Per image token (B, N): mask share, own top-1 = label, last-block [CLS] attention."""
    anatomy = ViTAnatomy.from_model(model)
    last = anatomy.depth - 1
    prefix, cls = anatomy.num_prefix_tokens, anatomy.readout.cls_index
    with anatomy.capture([("residual", last)], attention=[last]) as cap:
        anatomy.forward(images)
    own = anatomy.project(cap.tokens[("residual", last)][:, prefix:]).argmax(-1)
    attention = cap.attention[last][:, :, cls, prefix:].mean(1)
    grid = anatomy.grid_size(images.shape)
    share = F.adaptive_avg_pool2d(masks.float(), grid).flatten(1)
    return {
        "share": share,
        "own": (own == labels[:, None]).float(),
        "attention": attention / attention.sum(1, keepdim=True),
    }


@torch.no_grad()
def logit_drops(model, images, labels, octile_of: torch.Tensor) -> torch.Tensor:
    """(B, 8): clean label logit minus the label logit with one octile's tokens removed."""
    path = find_token_path(model)
    tokens = path.embed(images)
    prefix = path.num_prefix_tokens
    clean = target_class_column(path.classify(tokens), labels)
    drops = []
    for octile in range(OCTILES):
        keep = octile_of != octile  # (B, N), the same count per image
        image_tokens = tokens[:, prefix:][keep].view(len(images), -1, tokens.shape[-1])
        kept = torch.cat([tokens[:, :prefix], image_tokens], 1)
        drops.append(clean - target_class_column(path.classify(kept), labels))
    return torch.stack(drops, 1)


def octile_table(
    model, maps: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, facts: dict
) -> list[list[float]]:
    """Rows (octile 1..8) of the COLUMNS means over images and tokens."""
    values = maps.flatten(1)
    ranks = perturbation_ranks(values, "positive", images)  # 0 = most important
    octile_of = ranks * OCTILES // values.shape[1]
    drops = logit_drops(model, images, labels, octile_of)
    share = facts["share"]
    kinds = {"object": share == 1, "edge": (share > 0) & (share < 1), "background": share == 0}
    rows = []
    for octile in range(OCTILES):
        chosen = octile_of == octile
        n = chosen.sum()
        row = [float((kinds[k] & chosen).sum() / n) * 100 for k in ("object", "edge", "background")]
        row.append(float((facts["own"] * chosen).sum() / n) * 100)
        row.append(float((facts["attention"] * chosen).sum(1).mean()) * 100)
        row.append(float(drops[:, octile].mean()))
        rows.append(row)
    return rows


def markdown(model_name: str, n: int, tables: dict[str, list[list[float]]]) -> str:
    lines = [
        f"# Ranking diagnosis: {model_name}, {n} images",
        "",
        "Per octile of each map's ranking (1 = most important eighth of the image tokens): "
        "% object / edge / background tokens, % whose own last-block top-1 class is the label, "
        "% of the last block's [CLS] attention to image tokens (12.5 % for a random octile), and "
        "the mean drop of the label logit when the octile's tokens are removed.",
    ]
    for method, rows in tables.items():
        lines += ["", f"## `{method}`", "", "| octile | " + " | ".join(COLUMNS) + " |"]
        lines.append("|---" * (len(COLUMNS) + 1) + "|")
        for octile, row in enumerate(rows, 1):
            cells = [f"{v:.1f}" for v in row[:5]] + [f"{row[5]:.3f}"]
            lines.append(f"| {octile} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("fashion-scenes", "fashion"), default="fashion-scenes")
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--methods", nargs="+", default=None, help="default: every method built from its name"
    )
    parser.add_argument(
        "--probes", type=Path, help="fitted LinearProbes (file or folder): adds linear_probe"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    start = time.time()
    model, preprocessing = load_default(args.model)
    images, labels, masks = load_default_eval(
        args.num_images, dataset=args.model, masks=True, preprocessing=preprocessing
    )
    methods = args.methods or list_methods(needs_fitting=False)
    explainers = {name: create_method(name, model) for name in methods}
    if args.probes is not None:
        probes = LinearProbes.load(args.probes)
        explainers["linear_probe"] = create_method("linear_probe", model, probes=probes)
    sums: dict[str, torch.Tensor] = {}
    for begin in range(0, len(images), args.batch_size):
        part = slice(begin, begin + args.batch_size)
        x, y, m = images[part], labels[part], masks[part]
        facts = token_facts(model, x, y, m)
        for name, explainer in explainers.items():
            maps = explainer.attribute(x, target=y)
            rows = octile_table(model, maps, x, y, facts)
            weighted = torch.tensor(rows, dtype=torch.float64) * len(x)
            sums[name] = weighted if name not in sums else sums[name] + weighted
        print(f"{min(begin + args.batch_size, len(images))}/{len(images)} images", flush=True)
    tables = {name: (total / len(images)).tolist() for name, total in sums.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"diagnose_ranking_{args.model}"
    summary = {
        "model": args.model,
        "num_images": len(images),
        "columns": list(COLUMNS),
        "octiles": {
            name: [[round(v, 4) for v in row] for row in rows] for name, rows in tables.items()
        },
        "seconds": round(time.time() - start, 1),
    }
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(args.model, len(images), tables))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
