"""Train the project's embedded ViT on Fashion-MNIST (run once; not part of CI).

The recipe, seed, training time and test accuracy are written next to the weights in
``assets/default_vit.json``; the weights go to ``assets/default_vit.safetensors``.

Example:
    python benchmarks/train_default_model.py --epochs 18 --out assets
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from class_space_saliency._fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

ARCH = dict(
    img_size=28,
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
MEAN, STD = 0.2860, 0.3530


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> normalised float (N, 3, 28, 28), grey replicated."""
    x = images.float().div(255.0).sub(MEAN).div(STD)
    return x.unsqueeze(1).expand(-1, 3, -1, -1)


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``shift`` pixels (zero fill)."""
    n = images.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None], images.flip(-1), images)
    padded = F.pad(images, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28)[None]).unsqueeze(-1)
    cols = (dx[:, None] + torch.arange(28)[None]).unsqueeze(1)
    return padded[torch.arange(n)[:, None, None], rows, cols]


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 1000):
        logits = model(to_model_input(images[start : start + 1000]))
        correct += (logits.argmax(-1) == labels[start : start + 1000]).sum().item()
    model.train()
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--shift", type=int, default=2, help="max random translation (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("class_space_saliency/assets"))
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from a JSON config written by this script (weights next to it); "
        "its recipe, history and time are kept as earlier stages",
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    train_x, train_y = (torch.from_numpy(a) for a in load_fashion_mnist("train"))
    test_x, test_y = (torch.from_numpy(a) for a in load_fashion_mnist("test"))

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **ARCH)
    earlier = {"stages": [], "history": [], "training_time_s": 0.0}
    if args.init is not None:
        earlier = json.loads(args.init.read_text())
        model.load_state_dict(load_file(str(args.init.with_suffix(".safetensors"))))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
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
    first_epoch = len(earlier["history"])
    start = time.time()
    model.train()
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_x), generator=generator)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = to_model_input(augment(train_x[idx], generator, args.shift))
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item()
        accuracy = evaluate(model, test_x, test_y)
        elapsed = time.time() - start
        history.append(
            dict(
                epoch=first_epoch + epoch + 1,
                loss=running / steps_per_epoch,
                test_acc=accuracy,
                time_s=earlier["training_time_s"] + elapsed,
            )
        )
        print(json.dumps(history[-1]), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "default_vit.safetensors"))
    config = dict(
        architecture="timm.models.vision_transformer.VisionTransformer",
        kwargs=ARCH,
        mean=[MEAN] * 3,
        std=[STD] * 3,
        input_size=[3, 28, 28],
        class_names=list(FASHION_MNIST_CLASSES),
        dataset="Fashion-MNIST (Zalando Research, MIT licence), 60,000 train / 10,000 test",
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
                augmentation=f"random horizontal flip, random translation up to {args.shift} px "
                "(zero fill)",
                seed=args.seed,
                threads=args.threads,
                torch=torch.__version__,
                timm=timm.__version__,
                init=None if args.init is None else "weights of the previous stage",
            ),
        ],
        training_time_s=round(earlier["training_time_s"] + time.time() - start, 1),
        test_accuracy=history[-1]["test_acc"],
        history=[*earlier["history"], *history],
    )
    (args.out / "default_vit.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"test accuracy {config['test_accuracy']:.4f}, {config['training_time_s']:.0f} s")


if __name__ == "__main__":
    main()
