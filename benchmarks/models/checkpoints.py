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


def num_params(model: nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
