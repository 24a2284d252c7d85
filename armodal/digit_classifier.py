"""A small CNN digit classifier, trained in this project for evaluation only: it reads the
digits that text -> image generation draws, so "classified as <d>" has a judge independent of
the generative model. Trained on the run's own train split, tested on its held-out split, and
cached beside the run (`<run>/eval/digit_classifier.safetensors`) with its test accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = ["DigitClassifier", "train_classifier", "load_or_train_classifier"]


class DigitClassifier(nn.Module):
    """(N, 1, H, W) uint8 -> (N, 10) logits: two conv blocks and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(64 * 16, 10)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0  # (N, 1, H, W)
        return self.head(self.features(x).flatten(1))

    @torch.inference_mode()
    def predict(self, images: Tensor, batch_size: int = 500) -> Tensor:
        """(N,) predicted digits."""
        self.eval()
        return torch.cat([self(b).argmax(-1) for b in images.split(batch_size)])


def train_classifier(images: Tensor, labels: Tensor, epochs: int = 4, seed: int = 0
                     ) -> DigitClassifier:
    """Fit on (N, 1, H, W) uint8 images with (N,) labels; small random shifts as augmentation
    (generated digits are not always centred as MNIST's are)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(images), generator=g).split(64):
            x = images[idx]
            dy, dx = torch.randint(-2, 3, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def load_or_train_classifier(cache: Path, train_images: Tensor, train_labels: Tensor,
                             test_images: Tensor, test_labels: Tensor
                             ) -> tuple[DigitClassifier, float]:
    """The cached classifier and its test accuracy, or a new one trained and cached. The cache
    is keyed by the split sizes, so another split trains afresh."""
    weights, meta = cache / "digit_classifier.safetensors", cache / "digit_classifier.json"
    key = {"train": len(train_images), "test": len(test_images)}
    if weights.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("key") == key:
            model = DigitClassifier()
            model.load_state_dict(load_file(str(weights)))
            return model.eval(), float(info["test_accuracy"])
    model = train_classifier(train_images, train_labels)
    accuracy = float((model.predict(test_images) == test_labels).float().mean())
    cache.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(weights))
    meta.write_text(json.dumps({"key": key, "test_accuracy": accuracy}))
    return model, accuracy
