"""Peak memory of the streaming analyses against the number of images (bounded memory).

Each (analysis, number of images) runs in a fresh Python process on the embedded
fashion-scenes model. The process loads the model and the 1,000 evaluation images (uint8,
3 MB), runs one warm-up batch of the analysis, records its resident set size, then runs
the analysis on the first n images, read lazily in batches of 50 (as a ``DataLoader``
would hand them over). The figure is the growth of the peak resident set size over the
warm-up level (``ru_maxrss``, which the kernel tracks for the whole process, Python and
torch allocations alike); flat in n means memory does not grow with the data.

``linear_probes`` fits on the first n images and scores on the same n (this measures
memory, not accuracy); ``key_value_agreement`` keeps two per-image rates per block and
component, 48 bytes per image here.

Writes ``benchmarks/results/analysis_memory.json`` and prints a markdown table.

Example:
    python benchmarks/analysis_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ANALYSES = ("key_value_agreement", "linear_probes")
SIZES = (100, 300, 1000)
BATCH = 50


def batches(n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` evaluation images, normalised one batch at a time."""
    from class_space_saliency.data import load_default_eval_uint8
    from class_space_saliency.models import embedded_preprocessing

    prep = embedded_preprocessing("fashion-scenes")
    raw, labels = load_default_eval_uint8(n, dataset="fashion-scenes")
    for start in range(0, n, BATCH):
        pixels = torch.from_numpy(raw[start : start + BATCH]).permute(0, 3, 1, 2).float() / 255
        yield prep.normalize(pixels), torch.from_numpy(labels[start : start + BATCH])


def run(name: str, model: torch.nn.Module, n: int) -> None:
    from class_space_saliency import analysis

    options = dict(batch_size=BATCH, progress=False)
    if name == "key_value_agreement":
        analysis.key_value_agreement(model, batches(n), **options)
    else:
        analysis.linear_probes(model, batches(n), batches(n), **options)


def peak_kib() -> int:
    """Peak resident set size of this process so far, KiB (Linux ``ru_maxrss``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(name: str, n: int) -> None:
    """Run one measurement and print it as JSON (in a fresh process)."""
    from class_space_saliency.models import load_default

    torch.set_num_threads(1)
    model, _ = load_default("fashion-scenes")
    run(name, model, BATCH)  # warm-up: one batch, every buffer of a batch allocated once
    before = peak_kib()
    start = time.perf_counter()
    run(name, model, n)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(analysis=name, images=n, warm_kib=before, peak_kib=peak_kib(),
                          seconds=round(seconds, 2))))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("ANALYSIS", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]))
        return
    rows = []
    for name in ANALYSES:
        for n in SIZES:
            command = [sys.executable, __file__, "--worker", name, str(n)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            row = json.loads(output.strip().splitlines()[-1])
            row["growth_mib"] = round((row["peak_kib"] - row["warm_kib"]) / 1024, 1)
            rows.append(row)
            print(row, flush=True)
    lines = [
        "| analysis | images | peak RSS MiB | growth over warm-up MiB | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['analysis']} | {r['images']} | {r['peak_kib'] / 1024:.1f} | {r['growth_mib']:.1f} "
        f"| {r['seconds']:.1f} |"
        for r in rows
    ]
    print("\n".join(lines))
    path = args.out / "analysis_memory.json"
    path.write_text(json.dumps(dict(batch_size=BATCH, threads=1, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
