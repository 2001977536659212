"""Cost and exactness of ``decompose`` on the embedded model, against one plain forward pass.

For each batch size this times, in interleaved rounds (``speedkit.timing``: a warm-up round,
then at least 5 rounds in which every call runs once, medians with interquartile ranges):

- ``forward``: the embedded model's plain ``torch.no_grad()`` forward pass (the reference);
- ``decompose``: :func:`class_space_saliency.decompose`, frozen norm (the default);
- ``decompose_recomputed``: the same with ``norm="recomputed"`` (the paper's logit lens);
- ``class_space_contributions``: the registered method's map (all blocks and heads);
- ``class_space``: the class-space map of the last block, for comparison;

and, over the timed images, the largest relative error ``|total() - logit| / |logit|`` of
the decomposition against the model's own logit of the predicted class.

Writes ``benchmarks/results/decomposition.json`` (``--out``) and prints a Markdown table.

Example:
    python benchmarks/decomposition.py --threads 1  # ~1 min on an idle 2-core CPU
    python benchmarks/decomposition.py --device cuda --out /tmp/decomposition_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from speedkit.timing import Repeats, interleave, paired_ratio, summary, warm_up

from class_space_saliency import decompose
from class_space_saliency.data import load_default_eval
from class_space_saliency.methods import create_method
from class_space_saliency.models import load_default

RESULTS = Path(__file__).resolve().parent / "results"


def measure(batch_size: int, device: str, repeats: Repeats) -> dict:
    """One row per call at ``batch_size``: times, ratio to the forward pass, exactness."""
    model, _ = load_default(device=device)
    images, _ = load_default_eval(batch_size)
    images = images.to(device)
    contributions = create_method("class_space_contributions", model)
    class_space = create_method("class_space", model)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else None

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(images)

    calls = {
        "forward": forward,
        "decompose": lambda: decompose(model, images),
        "decompose_recomputed": lambda: decompose(model, images, norm="recomputed"),
        "class_space_contributions": lambda: contributions.attribute(images),
        "class_space": lambda: class_space.attribute(images),
    }
    round_s, outputs = warm_up(calls, synchronize)
    times = interleave(calls, repeats.count(round_s), synchronize)
    parts = outputs["decompose"]
    logits = outputs["forward"][torch.arange(batch_size, device=device), parts.target]
    error = float(((parts.total() - logits).abs() / logits.abs()).max())
    rows = []
    for name, seconds in times.items():
        median = summary(seconds)
        ratio = paired_ratio(seconds, times["forward"])
        rows.append(
            dict(
                name=name,
                batch_size=batch_size,
                median_ms=median.value * 1e3,
                iqr_ms=[median.low * 1e3, median.high * 1e3],
                per_image_ms=median.value * 1e3 / batch_size,
                ratio_to_forward=ratio.value,
                ratio_iqr=[ratio.low, ratio.high],
                rounds=len(seconds),
            )
        )
    return dict(batch_size=batch_size, max_relative_error=error, rows=rows)


def render(results: list[dict]) -> str:
    """A Markdown table of every row, and the exactness per batch size."""
    lines = [
        "| batch | call | median ms [IQR] | ms per image | x forward [IQR] |",
        "|---:|---|---:|---:|---:|",
    ]
    for result in results:
        for row in result["rows"]:
            low, high = row["iqr_ms"]
            ratio_low, ratio_high = row["ratio_iqr"]
            lines.append(
                f"| {row['batch_size']} | {row['name']} | {row['median_ms']:.2f} "
                f"[{low:.2f}, {high:.2f}] | {row['per_image_ms']:.3f} | "
                f"{row['ratio_to_forward']:.2f} [{ratio_low:.2f}, {ratio_high:.2f}] |"
            )
    lines.append("")
    for result in results:
        lines.append(
            f"batch {result['batch_size']}: max |total - logit| / |logit| = "
            f"{result['max_relative_error']:.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "decomposition.json")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.time()
    results = [measure(b, args.device, Repeats(budget_s=5.0)) for b in args.batch_sizes]
    meta = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        device=args.device,
        torch_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()),
        gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        model="embedded fashion-scenes ViT (load_default()), 32x32 images",
        date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        duration_s=time.time() - start,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, results=results), indent=1) + "\n")
    print(render(results))


if __name__ == "__main__":
    main()
