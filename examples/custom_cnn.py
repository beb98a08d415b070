"""Split a network of your own with Tandem's Python API: a small CNN that is not in the zoo,
trained on the embedded 8x8 digits, cut, distilled and written as a bundle that
``tandem cloud serve`` and ``tandem edge run`` serve without this file.

    python examples/custom_cnn.py --out runs/tinynet
    python examples/custom_cnn.py --out runs/tinynet --set distill.head.epochs=2  # quicker

It prints one JSON line: the network's own test accuracy and the bundle's operating points.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import tandem
from tandem.data import load_data


class TinyNet(nn.Module):
    """A plain CNN for 1x8x8 inputs: two convolutions to 32x4x4 ("features"), then a
    convolutional classifier. It takes normalised floats: ``(x / 255 - MEAN) / STD``."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for normalised inputs (N, 1, 8, 8)."""
        return self.classifier(self.features(x))


class Digits(Dataset):
    """One split of the digits as (uint8 image tensor (1, 8, 8), label) items: the form
    ``tandem.build_bundle`` reads any map-style data set in."""

    def __init__(self, split: str) -> None:
        data = load_data("digits")
        part = data.train if split == "train" else data.test
        self.x, self.targets = torch.from_numpy(part.x), part.y.tolist()
        self.classes = data.classes

    def __len__(self) -> int:
        """The number of images in the split."""
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` (uint8, (1, 8, 8)) and its label."""
        return self.x[i], self.targets[i]


# The normalisation the network is trained with; build_bundle is told the same.
MEAN, STD = 0.5, 0.25


def normalised(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels as the network's float input."""
    return (x.float() / 255 - MEAN) / STD


def train(model: TinyNet, data: Digits, epochs: int) -> None:
    """Your own training loop: nothing of Tandem's."""
    x, y = data.x, torch.tensor(data.targets)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=gen).split(64):
            loss = F.cross_entropy(model(normalised(x[rows])), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


def main(argv: list[str] | None = None) -> int:
    """Train the network, list its cuts, split it, build the bundle; print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the bundle directory to write")
    p.add_argument("--epochs", type=int, default=30, help="epochs of your own training loop")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a digits-recipe override, as tandem train --set takes it")  # fmt: skip
    args = p.parse_args(argv)
    torch.manual_seed(0)
    train_set, test_set = Digits("train"), Digits("test")
    model = TinyNet()
    train(model, train_set, args.epochs)

    example = normalised(train_set.x[:4])
    cuts = {c.name: c.shape for c in tandem.cut_points(model, example)}
    head, _ = tandem.split_at(model, "features", example)  # checks tail(head(x)) == model(x)
    manifest = tandem.build_bundle(
        model, "features", train_set, test_set, out=args.out, name="tinynet",
        mean=[MEAN], std=[STD], overrides=args.set, fresh=True,
    )  # fmt: skip
    print(json.dumps({
        "bundle": args.out,
        "cuts": cuts,
        "head_output": list(head(example).shape[1:]),
        "teacher_accuracy": manifest.teacher_accuracy,
        "points": [p.model_dump() for p in manifest.table],
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
