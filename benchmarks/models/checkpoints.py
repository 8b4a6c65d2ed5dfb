"""Checkpoint caching shared by the evaluation models: load `checkpoints/<name>.pt` or train."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_path(name: str) -> Path:
    return CHECKPOINT_DIR / f"{name}.pt"


def save(model: nn.Module, name: str) -> Path:
    path = checkpoint_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def load_or_train(name: str, build: Callable[[], nn.Module], train: Callable[..., nn.Module],
                  data, retrain: bool = False) -> nn.Module:
    """The model in eval mode from its checkpoint if it loads, else trained with seed 0 and saved."""
    path = checkpoint_path(name)
    if path.exists() and not retrain:
        model = build()
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except (RuntimeError, KeyError) as e:  # architecture changed since the checkpoint
            warnings.warn(f"{path} does not match {name}; retraining ({e})")
    model = train(seed=0, data=data)
    save(model, name)
    return model


class Family:
    """Evaluation models trained on one dataset: names (and short aliases), how to build and
    train each, and the data loader; `get_model` loads a checkpoint or trains one."""

    def __init__(self, kind: str, builders: dict[str, Callable[[], nn.Module]],
                 trainers: dict[str, Callable[..., nn.Module]], aliases: dict[str, str],
                 load_data: Callable[[], object]):
        self.kind, self.builders, self.trainers = kind, builders, trainers
        self.aliases, self.load_data = aliases, load_data

    def canonical(self, name: str) -> str:
        name = self.aliases.get(name, name)
        if name not in self.builders:
            raise KeyError(f"unknown {self.kind} model {name!r}; choose from {tuple(self.builders)}")
        return name

    def checkpoint_path(self, name: str) -> Path:
        return checkpoint_path(self.canonical(name))

    def get_model(self, name: str, retrain: bool = False) -> tuple[nn.Module, object]:
        """(model in eval mode, the family's data): from `checkpoints/<name>.pt` when it loads,
        else (or with `retrain`) trained with seed 0 and saved."""
        name = self.canonical(name)
        data = self.load_data()
        return load_or_train(name, self.builders[name], self.trainers[name], data, retrain), data

    def save(self, model: nn.Module, name: str) -> Path:
        return save(model, self.canonical(name))


def num_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
