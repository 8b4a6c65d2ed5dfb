"""Small image classifiers trained on scikit-learn's bundled ``digits`` data set.

The data (1797 8x8 grey-scale images of the digits 0-9, pixel values 0..16)
ships inside scikit-learn, so nothing is downloaded.  It is split
deterministically into 1397 training and 400 test images (stratified,
``random_state=0``) and scaled to [0, 1], shaped ``[N, 1, 8, 8]``.

Two models:

* ``digits_cnn`` -- a small CNN built from ``torch.nn`` (two 3x3 conv layers,
  max-pool, linear head);
* ``digits_vit`` -- a tiny ViT, ``transformers.ViTForImageClassification``
  with image_size=8, patch_size=2 (16 patches + CLS), hidden 64, 3 layers.

Usage::

    from benchmarks.models import digits
    model, (x_train, y_train, x_test, y_test) = digits.get_model("digits_cnn")
    print(digits.accuracy(model, x_test, y_test))

``get_model`` loads ``benchmarks/models/checkpoints/<name>.pt`` (a plain
``state_dict``) when present and otherwise trains the model (seed 0) and saves
it there.  `python -m benchmarks.models.train_all` (re)trains them and prints metrics.
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.models import checkpoints as _ckpt
from benchmarks.models.checkpoints import CHECKPOINT_DIR  # noqa: F401  (train_all reads it here)


N_TEST = 400
SPLIT_SEED = 0

MODEL_NAMES = ("digits_cnn", "digits_vit")
_ALIASES = {"cnn": "digits_cnn", "vit": "digits_vit"}


# --------------------------------------------------------------------------- data

def load_data():
    """Return ``(x_train, y_train, x_test, y_test)``.

    ``x_*`` are float32 tensors in [0, 1] shaped ``[N, 1, 8, 8]``; ``y_*`` are
    int64 class labels.  1397 train / 400 test, stratified, fixed seed.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = torch.tensor(ds.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(ds.target, dtype=torch.int64)
    idx = list(range(len(y)))
    tr, te = train_test_split(
        idx, test_size=N_TEST, random_state=SPLIT_SEED, stratify=ds.target
    )
    tr = torch.tensor(sorted(tr))
    te = torch.tensor(sorted(te))
    return x[tr].contiguous(), y[tr].contiguous(), x[te].contiguous(), y[te].contiguous()


# ------------------------------------------------------------------------- models

class DigitsCNN(nn.Module):
    """conv3x3(1->16) - ReLU - conv3x3(16->32) - ReLU - maxpool2 - flatten - linear(512->64) - ReLU - linear(64->10)."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(c2 * 4 * 4, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def vit_config():
    """The ``transformers.ViTConfig`` of ``digits_vit``."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
    )


def build_cnn() -> DigitsCNN:
    """An untrained ``digits_cnn``."""
    return DigitsCNN()


def build_vit():
    """An untrained ``digits_vit`` (``ViTForImageClassification``)."""
    from transformers import ViTForImageClassification

    return ViTForImageClassification(vit_config())


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ----------------------------------------------------------------------- training

def _shift_augment(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Randomly translate each image by up to ``max_shift`` pixels (zero fill)."""
    n = x.shape[0]
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for sx in range(2 * p + 1):
        for sy in range(2 * p + 1):
            m = (dx == sx) & (dy == sy)
            if m.any():
                out[m] = padded[m, :, sy:sy + 8, sx:sx + 8]
    return out


def _train(model, data, *, seed, epochs, batch_size, lr, weight_decay, augment):
    x_train, y_train, _, _ = data
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            b = perm[i:i + batch_size]
            xb = x_train[b]
            if augment:
                xb = _shift_augment(xb, gen)
            loss = F.cross_entropy(_logits(model, xb), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def train_cnn(seed: int = 0, data=None) -> DigitsCNN:
    """Train ``digits_cnn`` from scratch with a fixed seed; returns it in eval mode.

    AdamW (lr 3e-3 one-cycle, wd 1e-4), batch 64, 30 epochs, random +-1 pixel
    shifts as augmentation.  About 3 s on one CPU thread; test accuracy 0.995.
    """
    data = load_data() if data is None else data
    torch.manual_seed(seed)
    model = build_cnn()
    return _train(model, data, seed=seed, epochs=30, batch_size=64, lr=3e-3,
                  weight_decay=1e-4, augment=True)


def train_vit(seed: int = 0, data=None):
    """Train ``digits_vit`` from scratch with a fixed seed; returns it in eval mode.

    AdamW (lr 2e-3 one-cycle, wd 0.05), batch 64, 60 epochs, no augmentation
    (shift augmentation made this small ViT underfit).  About 23 s on one CPU
    thread; test accuracy 0.9775.
    """
    data = load_data() if data is None else data
    torch.manual_seed(seed)
    model = build_vit()
    return _train(model, data, seed=seed, epochs=60, batch_size=64, lr=2e-3,
                  weight_decay=0.05, augment=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` (runs in eval mode, batch of 512)."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], 512):
        correct += (_logits(model, x[i:i + 512]).argmax(-1) == y[i:i + 512]).sum().item()
    model.train(was_training)
    return correct / x.shape[0]


# ---------------------------------------------------------------------- checkpoints

FAMILY = _ckpt.Family("digits", builders={"digits_cnn": build_cnn, "digits_vit": build_vit},
                        trainers={"digits_cnn": train_cnn, "digits_vit": train_vit},
                        aliases=_ALIASES, load_data=load_data)
# get_model(name, retrain=False) -> (model, data); data is load_data()'s result
checkpoint_path, get_model, save = FAMILY.checkpoint_path, FAMILY.get_model, FAMILY.save
num_params = _ckpt.num_params
