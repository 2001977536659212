"""Train one of the project's embedded ViTs (run once per model; not part of CI).

``--dataset fashion`` trains on Fashion-MNIST (28x28 grey, black background);
``--dataset fashion-scenes`` on fashion-scenes (32x32 RGB composites on natural photos, see
``class_space_saliency/scenes.py``), with freshly composited training images every epoch and
test backgrounds from photos never used in training. The recipe, seed, per-epoch history,
training time and test accuracy are written next to the weights in
``<out>/<dataset>_vit.json``; the weights go to ``<out>/<dataset>_vit.safetensors``.

Example:
    python benchmarks/train_default_model.py --dataset fashion-scenes --epochs 26 --shift 0 \
        --lr 0.001 --transfer class_space_saliency/assets/fashion_vit.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from class_space_saliency import scenes
from class_space_saliency._fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

VIT = dict(
    patch_size=4,
    in_chans=3,
    num_classes=10,
    embed_dim=96,
    depth=6,
    num_heads=4,
    mlp_ratio=2.0,
    class_token=True,
    global_pool="token",
)


@dataclass(frozen=True)
class DatasetSpec:
    """What differs between the embedded data sets.

    Attributes:
        img_size: Square input side.
        mean: Per-channel normalisation mean.
        std: Per-channel normalisation std.
        description: Recorded in the model's JSON.
        augmentation: Recorded in the model's JSON.
        train: ``epoch -> uint8 images`` (and labels) for that epoch.
        test: ``() -> (uint8 images, labels)``.
    """

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str
    augmentation: str
    train: Callable[[int], tuple[np.ndarray, np.ndarray]]
    test: Callable[[], tuple[np.ndarray, np.ndarray]]


def _fashion(split: str, epoch: int = 0, indices: range | None = None) -> tuple[np.ndarray, ...]:
    images, labels = _fashion_arrays(split)
    return (images, labels) if indices is None else (images[indices], labels[indices])


@cache
def _fashion_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's IDX files, read once per process (every epoch reuses them)."""
    return load_fashion_mnist(split)


def _scenes(
    split: str, seed: int = 0, epoch: int = 0, indices: range | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Composites of a split: training ones redrawn per epoch, test ones fixed (seed 0)."""
    images, _, labels = scenes.generate(split, indices, seed=seed * 1000 + epoch)
    return images, labels


def _submit(pool: ProcessPoolExecutor, spec: DatasetSpec, epoch: int, workers: int) -> list:
    """Start compositing an epoch's training images in ``workers`` chunks."""
    chunks = np.array_split(np.arange(60_000), workers)
    return [pool.submit(spec.train, epoch, range(c[0], c[-1] + 1)) for c in chunks]


def _collect(futures: list[Future]) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [future.result() for future in futures]
    return tuple(torch.from_numpy(np.concatenate([p[i] for p in parts])) for i in (0, 1))


def _spec(name: str, seed: int) -> DatasetSpec:
    if name == "fashion":
        return DatasetSpec(
            img_size=28,
            mean=(0.2860,) * 3,
            std=(0.3530,) * 3,
            description="Fashion-MNIST (Zalando Research, MIT licence), 60,000 train / 10,000 test",
            augmentation="random horizontal flip, random translation up to {shift} px (zero fill)",
            train=partial(_fashion, "train"),
            test=partial(_fashion, "test"),
        )
    if name == "fashion-scenes":
        return DatasetSpec(
            img_size=scenes.CANVAS,
            # fixed constants: statistics of 10,000 composites (every 6th training object,
            # seed 0) drawn before the training variation of backgrounds was added
            mean=(0.4256, 0.4113, 0.4094),
            std=(0.2239, 0.2155, 0.2166),
            description=(
                "fashion-scenes (class_space_saliency/scenes.py): Fashion-MNIST objects "
                "composited on crops of scikit-image photos; 60,000 train composites redrawn "
                f"every epoch on {', '.join(scenes.TRAIN_PHOTOS)}; 10,000 test composites "
                f"(seed 0) on held-out {', '.join(scenes.TEST_PHOTOS)}"
            ),
            augmentation="new composite every epoch (scale, position, colour, background crop), "
            "random horizontal flip, random translation up to {shift} px (zero fill)",
            train=partial(_scenes, "train", seed),
            test=partial(_scenes, "test"),
        )
    raise ValueError(f"dataset must be 'fashion' or 'fashion-scenes', got {name!r}")


def to_model_input(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 (N, H, W) grey or (N, H, W, 3) RGB -> normalised float (N, 3, H, W)."""
    x = images.float().div(255.0)
    x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: torch.Tensor, generator: torch.Generator, shift: int) -> torch.Tensor:
    """Random horizontal flip and a random translation up to ``shift`` px (zero fill).

    Works on grey (N, H, W) and channel-last RGB (N, H, W, 3) uint8 batches.
    """
    n, height, width = images.shape[:3]
    flip = torch.rand(n, generator=generator) < 0.5
    flip = flip.view(n, *([1] * (images.ndim - 1)))
    images = torch.where(flip, images.flip(2), images)
    if shift == 0:
        return images
    pad = (0, 0) * (images.ndim - 3) + (shift, shift, shift, shift)
    padded = F.pad(images, pad)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None]).unsqueeze(-1)
    cols = (dx[:, None] + torch.arange(width)[None]).unsqueeze(1)
    return padded[torch.arange(n)[:, None, None], rows, cols]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec
) -> float:
    """Top-1 accuracy on uint8 images, in batches of 1,000."""
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        device = next(model.parameters()).device
        logits = model(to_model_input(images[start : start + 1000], spec).to(device))
        correct += (logits.argmax(-1).cpu() == labels[start : start + 1000]).sum().item()
    model.train()
    return correct / len(images)


def transferred_state(config: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Another embedded model's weights, position embedding resampled to ``model``'s grid."""
    from timm.layers import resample_abs_pos_embed

    source = json.loads(config.read_text())
    grid = source["kwargs"]["img_size"] // source["kwargs"]["patch_size"]
    state = load_file(str(config.with_suffix(".safetensors")))
    state["pos_embed"] = resample_abs_pos_embed(
        state["pos_embed"],
        new_size=model.patch_embed.grid_size,
        old_size=(grid, grid),
        num_prefix_tokens=model.num_prefix_tokens,
    )
    return state


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=("fashion", "fashion-scenes"), default="fashion")
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--shift", type=int, default=2, help="max random translation (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=2, help="processes compositing each epoch's images"
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="composite the next epoch's images while this one trains (for a GPU; on a CPU "
        "it oversubscribes the cores: 228 s per epoch against 176 s sequential on 2 cores)",
    )
    parser.add_argument("--device", default="cpu", help="where to train (recorded)")
    parser.add_argument("--out", type=Path, default=Path("class_space_saliency/assets"))
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from a JSON config written by this script (weights next to it); "
        "its recipe, history and time are kept as earlier stages",
    )
    parser.add_argument(
        "--transfer",
        type=Path,
        default=None,
        help="start from the weights of another model's JSON config written by this script "
        "(e.g. the fashion model), its position embedding resampled to this grid",
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    spec = _spec(args.dataset, args.seed)
    stem = args.dataset.replace("-", "_") + "_vit"
    start = time.time()
    test_x, test_y = (torch.from_numpy(np.ascontiguousarray(a)) for a in spec.test())

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=spec.img_size, **VIT
    )
    earlier = {"stages": [], "history": [], "training_time_s": 0.0}
    if args.init is not None:
        earlier = json.loads(args.init.read_text())
        model.load_state_dict(load_file(str(args.init.with_suffix(".safetensors"))))
    elif args.transfer is not None:
        model.load_state_dict(transferred_state(args.transfer, model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    first_epoch = len(earlier["history"])
    model.to(args.device)
    pool = ProcessPoolExecutor(max_workers=args.workers)
    pending = _submit(pool, spec, first_epoch, args.workers)
    train_x, train_y = _collect(pending)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    history = []
    model.train()
    for epoch in range(args.epochs):
        global_epoch = first_epoch + epoch
        if epoch > 0:
            if not args.overlap:
                pending = _submit(pool, spec, global_epoch, args.workers)
            train_x, train_y = _collect(pending)
        if args.overlap and epoch + 1 < args.epochs:
            pending = _submit(pool, spec, global_epoch + 1, args.workers)
        order = torch.randperm(len(train_x), generator=generator)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = to_model_input(augment(train_x[idx], generator, args.shift), spec)
            logits = model(x.to(args.device))
            loss = F.cross_entropy(
                logits, train_y[idx].to(args.device), label_smoothing=args.label_smoothing
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
        accuracy = evaluate(model, test_x, test_y, spec)
        history.append(
            dict(
                epoch=global_epoch + 1,
                loss=running / steps_per_epoch,
                test_acc=accuracy,
                time_s=earlier["training_time_s"] + time.time() - start,
            )
        )
        print(json.dumps(history[-1]), flush=True)
    pool.shutdown()

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    state = {k: v.contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / f"{stem}.safetensors"))
    config = dict(
        name=args.dataset,
        architecture="timm.models.vision_transformer.VisionTransformer",
        kwargs=dict(img_size=spec.img_size, **VIT),
        mean=list(spec.mean),
        std=list(spec.std),
        input_size=[3, spec.img_size, spec.img_size],
        class_names=list(FASHION_MNIST_CLASSES),
        dataset=spec.description,
        stages=[
            *earlier["stages"],
            dict(
                optimizer="AdamW",
                lr=args.lr,
                weight_decay=args.weight_decay,
                schedule=f"linear warmup {args.warmup_epochs} epoch(s), then cosine to 0",
                epochs=args.epochs,
                batch_size=args.batch_size,
                label_smoothing=args.label_smoothing,
                augmentation=spec.augmentation.format(shift=args.shift),
                seed=args.seed,
                threads=args.threads,
                device=args.device,
                torch=torch.__version__,
                timm=timm.__version__,
                init=(
                    "weights of the previous stage"
                    if args.init is not None
                    else f"weights of {args.transfer.name} (position embedding resampled)"
                    if args.transfer is not None
                    else None
                ),
            ),
        ],
        training_time_s=round(earlier["training_time_s"] + time.time() - start, 1),
        test_accuracy=history[-1]["test_acc"],
        history=[*earlier["history"], *history],
    )
    (args.out / f"{stem}.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"test accuracy {config['test_accuracy']:.4f}, {config['training_time_s']:.0f} s")


if __name__ == "__main__":
    main()
