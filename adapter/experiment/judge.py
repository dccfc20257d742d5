"""The judge: a small CNN that reads every attribute off a 32 px image, and the `attributes` scorer of `surd eval`.

Trained on fresh renders of every combination (it is the instrument, not a model under test), augmented with
blur, noise and a round trip through the world's VAE so that generated images, which are softer than renders,
are read the way renders are. Saved as `judge.safetensors` + `judge.json` (the attributes and their values).

As a scorer (`surd eval --scorer attributes --judge FOLDER`) it compares what it reads with the prompt's true
`attributes` (prompt-set YAML files carry them): `acc_<attribute>` per image, their mean
`attribute_accuracy` (the primary metric), and `all_correct`.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from adapter.eval_scores import Metric
from surd.errors import SurdError

WEIGHTS, CONFIG = "judge.safetensors", "judge.json"


class AttributeNet(nn.Module):
    """Three conv stages (32 -> 4 px, positions kept: no global pooling), then one linear head per attribute."""

    def __init__(self, attributes: dict[str, list[str]], width: int = 32) -> None:
        super().__init__()
        self.attributes = attributes
        w = width

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 2 * w), nn.Flatten(),
                                      nn.Linear(2 * w * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in attributes.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.features(pixels)
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, pixels: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        """The attribute values the judge sees in each image ([N, 3, 32, 32] in [-1, 1])."""
        self.eval()
        out: list[dict[str, str]] = []
        for start in range(0, len(pixels), batch_size):
            logits = self(pixels[start : start + batch_size])
            choices = {name: logits[name].argmax(dim=1).tolist() for name in self.attributes}
            out += [{name: self.attributes[name][choices[name][i]] for name in self.attributes}
                    for i in range(len(choices[next(iter(self.attributes))]))]
        return out


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur some images a little and add a little noise: generated images are never as crisp as renders."""
    blurred = nn.functional.avg_pool2d(nn.functional.pad(batch, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(len(batch), 1, 1, 1, generator=generator) * 0.8
    noisy = batch * (1 - amount) + blurred * amount
    noisy = noisy + torch.randn(batch.shape, generator=generator) * 0.03
    return noisy.clamp(-1, 1)


def train_judge(images: torch.Tensor, labels: list[dict[str, str]], attributes: dict[str, list[str]], steps: int,
                batch_size: int = 64, learning_rate: float = 2e-3, seed: int = 0,
                log: Callable[[str], None] = print) -> AttributeNet:
    """Fit the judge to `images` ([N, 3, 32, 32] in [-1, 1]) and their true attribute `labels`."""
    torch.manual_seed(seed)
    net = AttributeNet(attributes).train()
    targets = {name: torch.tensor([values.index(label[name]) for label in labels])
               for name, values in attributes.items()}
    optimiser = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    order: list[int] = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += rng.sample(range(len(images)), len(images))
        index, order = torch.tensor(order[:batch_size]), order[batch_size:]
        logits = net(_augment(images[index], generator))
        loss = sum(nn.functional.cross_entropy(logits[name], targets[name][index]) for name in attributes)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 200 == 0 or step == steps:
            log(f"judge step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    return net.eval()


def accuracy(net: AttributeNet, images: torch.Tensor, labels: list[dict[str, str]]) -> dict[str, float]:
    """Share of images whose attribute the judge reads right, per attribute."""
    readings = net.read(images)
    return {name: sum(r[name] == t[name] for r, t in zip(readings, labels, strict=True)) / len(labels)
            for name in net.attributes}


def save_judge(net: AttributeNet, folder: Path, extra: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    from surd.shards import atomic_write_json

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS))
    atomic_write_json(folder / CONFIG, {"attributes": net.attributes, **extra})  # last: marks a finished judge


def load_judge(folder: Path) -> AttributeNet:
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise SurdError(f"--judge {folder}: no {WEIGHTS} + {CONFIG} (a judge `surd experiment` trained?)")
    net = AttributeNet(json.loads((folder / CONFIG).read_text())["attributes"])
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return net.eval()


class AttributeJudge:
    """The `attributes` scorer: reads each image's attributes and compares them with the prompt's truth."""

    primary = "attribute_accuracy"

    def __init__(self, model: str, device: str = "cpu") -> None:
        self.net = load_judge(Path(model))
        self.label = f"attribute judge ({Path(model).name}: {', '.join(self.net.attributes)})"
        self.metrics = (Metric("attribute_accuracy", "attribute accuracy", share=True),
                        *(Metric(f"acc_{name}", name, share=True) for name in self.net.attributes),
                        Metric("all_correct", "all attributes right", share=True))

    def score(self, records: list[dict[str, Any]], bar: Any = None) -> list[dict[str, Any]]:
        from adapter.experiment.base_model import pixels

        judged = [r for r in records if r.get("attributes")]
        images = []
        for record in judged:
            with Image.open(record["path"]) as image:
                images.append(image.convert("RGB").resize((32, 32), Image.BILINEAR))
        readings = iter(self.net.read(pixels(images)) if images else [])
        out = []
        for record in records:
            scores: dict[str, Any] = {m.name: None for m in self.metrics} | {"reading": None, "reading_ok": None}
            if record.get("attributes"):
                truth, seen = json.loads(record["attributes"]), next(readings)
                right = {name: seen[name] == truth.get(name) for name in self.net.attributes}
                scores.update({f"acc_{name}": float(ok) for name, ok in right.items()},
                              attribute_accuracy=sum(right.values()) / len(right),
                              all_correct=float(all(right.values())), reading=" ".join(seen.values()),
                              reading_ok=all(right.values()))
            out.append({**record, **scores})
        if bar is not None:
            bar.update(len(records))
        return out
