"""The judge: a small CNN that reads every attribute of a testbed scene, trained on procedural images only.

It is an independent instrument: it never sees generated images in training. Its penultimate features
(``Judge.features``) define a Fréchet distance between generated and real images.

    python -m tokenmerge.testbed.judge --size 32 --out src/tokenmerge/testbed/weights/judge-32.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .data import ATTRIBUTES, Scene, make_batch

WEIGHTS_DIR = Path(__file__).parent / "weights"
FEATURE_DIM = 128


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Judge(nn.Module):
    """Images in ``[0, 1]``, ``(B, 3, S, S)`` -> one logit vector per attribute. Any S divisible by 8."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, 32), _conv(32, 32), nn.MaxPool2d(2),
            _conv(32, 64), _conv(64, 64), nn.MaxPool2d(2),
            _conv(64, 128), _conv(128, FEATURE_DIM), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 128)``: the space of the Fréchet distance."""
        return self.body(images * 2 - 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted value index per attribute, ``{name: (B,)}``."""
        return {name: logits.argmax(-1) for name, logits in self(images).items()}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> float ``(B, 3, S, S)`` in ``[0, 1]``."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


def label_tensor(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    labels = [scene.labels() for scene in scenes]
    return {name: torch.tensor([lab[name] for lab in labels]) for name in ATTRIBUTES}


def correct(judge: Judge, images: torch.Tensor, scenes: list[Scene], batch: int = 256) -> torch.Tensor:
    """``(B, attributes)`` bool: whether the judge reads each attribute of each image as its caption says."""
    judge.eval()
    targets = label_tensor(scenes)
    rows = []
    for start in range(0, len(images), batch):
        predicted = judge.predict(images[start : start + batch])
        rows.append(torch.stack([predicted[n] == targets[n][start : start + batch] for n in ATTRIBUTES], dim=1))
    return torch.cat(rows)


def train_judge(size: int = 32, samples: int = 24000, epochs: int = 6, batch: int = 128, seed: int = 0,
                log=print) -> Judge:
    """Train on the procedural ``judge`` split (every caption, jittered renders), with light pixel noise."""
    torch.manual_seed(seed)
    images, scenes = make_batch("judge", samples, size)
    x, y = to_tensor(images), label_tensor(scenes)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (samples // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        judge.train()
        order = torch.randperm(samples, generator=gen)
        for start in range(0, samples - batch + 1, batch):
            idx = order[start : start + batch]
            inputs = (x[idx] + 0.03 * torch.randn(x[idx].shape, generator=gen)).clamp(0, 1)
            logits = judge(inputs)
            loss = sum(F.cross_entropy(logits[n], y[n][idx]) for n in ATTRIBUTES)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}")
    return judge.eval()


def default_weights(size: int) -> Path:
    return WEIGHTS_DIR / f"judge-{size}.safetensors"


def load_judge(size: int = 32, path: str | Path | None = None) -> Judge:
    """The shipped judge for images of ``size`` pixels (or the weights at ``path``)."""
    path = Path(path) if path is not None else default_weights(size)
    if not path.exists():
        raise FileNotFoundError(
            f"no judge weights at {path}; train them with `python -m tokenmerge.testbed.judge --size {size}`"
        )
    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the testbed judge on procedural images.")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=24000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    judge = train_judge(args.size, args.samples, args.epochs, seed=args.seed)
    minutes = (time.perf_counter() - start) / 60
    images, scenes = make_batch("test", 2000, args.size)
    held_images, held_scenes = make_batch("heldout", 1000, args.size)
    for name, (imgs, scs) in {"test": (images, scenes), "heldout": (held_images, held_scenes)}.items():
        ok = correct(judge, to_tensor(imgs), scs)
        per_attr = ", ".join(f"{n} {v:.4f}" for n, v in zip(ATTRIBUTES, ok.float().mean(0).tolist()))
        print(f"{name}: all attributes {ok.all(1).float().mean():.4f}; {per_attr}")
    out = args.out or default_weights(args.size)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, out)
    print(f"trained in {minutes:.1f} min; wrote {out}")


if __name__ == "__main__":
    main()
