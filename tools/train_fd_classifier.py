"""Train the Fashion-MNIST CNN whose features fedcore.evaluation.fid uses for the Frechet distance, and pin it.

Seeded training on the 60,000 training images, accuracy on the 10,000 test images; writes
fedcore/evaluation/assets/fmnist_classifier.safetensors (metadata: test_accuracy, seed, epochs) and
fedcore/evaluation/assets/fmnist_classifier.json (sha256 of the weights file, test accuracy, how it was made).

    python tools/train_fd_classifier.py            # about 5 minutes on 2 CPU cores (4 epochs of 70-100 s)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedcore.data.datasets import load_fashion_mnist, to_model_range  # noqa: E402 (after the sys.path entry: it runs as a file too)
from fedcore.evaluation.extractors import (  # noqa: E402 (the same)
    ASSET_DIR,
    CLASSIFIER_MANIFEST,
    CLASSIFIER_WEIGHTS,
    FMNISTClassifier,
    sha256_of_file,
)

log = logging.getLogger("train_fd_classifier")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0  # seeds the initialisation, the shuffling and the augmentation
    epochs: int = 4  # passes over the 60,000 training images
    batch_size: int = 128  # images per optimiser step
    lr: float = 3e-3  # peak AdamW learning rate of the one-cycle schedule
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    threads: int = 2  # torch intra-op threads (results are reproducible for a fixed thread count)
    out_dir: Path = ASSET_DIR  # where the .safetensors and .json are written


@torch.no_grad()
def accuracy(model: FMNISTClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` on images (N, 1, 28, 28) in [-1, 1]."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def train(config: TrainConfig) -> tuple[FMNISTClassifier, float]:
    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(config.seed)

    train_set, test_set = load_fashion_mnist(train=True), load_fashion_mnist(train=False)
    x_train, y_train = to_model_range(train_set.images), torch.from_numpy(train_set.labels)
    x_test, y_test = to_model_range(test_set.images), torch.from_numpy(test_set.labels)

    model = FMNISTClassifier()
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch)

    for epoch in range(config.epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        for start in range(0, len(x_train), config.batch_size):
            idx = order[start : start + config.batch_size]
            x, y = x_train[idx], y_train[idx]
            # Augmentation: horizontal flip of half the batch (garments are left-right symmetric classes).
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(idx)
        test_acc = accuracy(model, x_test, y_test)
        log.info(
            "epoch %d/%d: train loss %.4f, test accuracy %.4f, %.0f s",
            epoch + 1, config.epochs, total_loss / len(x_train), test_acc, time.perf_counter() - started,
        )  # fmt: skip
    return model, accuracy(model, x_test, y_test)


def write_assets(model: FMNISTClassifier, test_accuracy: float, config: TrainConfig, command: str) -> Path:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    weights_path = config.out_dir / CLASSIFIER_WEIGHTS
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"test_accuracy": f"{test_accuracy:.4f}", "seed": str(config.seed), "epochs": str(config.epochs)}
    save_file(state, weights_path, metadata=metadata)
    manifest = {
        "sha256": sha256_of_file(weights_path),
        "test_accuracy": round(test_accuracy, 4),
        "epochs": config.epochs,
        "seed": config.seed,
        "feature_dim": FMNISTClassifier.feature_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "command": command,
    }
    manifest_path = config.out_dir / CLASSIFIER_MANIFEST
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest_path


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    parser.add_argument("--out-dir", type=Path, default=defaults.out_dir)
    args = parser.parse_args(argv)
    config = TrainConfig(
        seed=args.seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, threads=args.threads,
        out_dir=args.out_dir,
    )  # fmt: skip

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(config.threads)
    log.info("config: %s", asdict(config))
    model, test_accuracy = train(config)
    command = shlex.join(["python", "tools/train_fd_classifier.py", *(sys.argv[1:] if argv is None else argv)])
    manifest_path = write_assets(model, test_accuracy, config, command)
    log.info("test accuracy %.4f; wrote %s", test_accuracy, manifest_path.read_text())


if __name__ == "__main__":
    main()
