"""Small byte-level causal LMs trained on Python standard-library docstrings.

Corpus: the docstrings of a fixed, sorted list of standard-library modules
(``MODULES``) -- each module's own docstring, then those of its public
classes and functions (sorted by name) and of the classes' public methods,
properties and ``__init__`` (sorted by name), each cleaned with
``inspect.cleandoc``; duplicates are dropped (first occurrence kept) and
everything is joined with blank lines.  Nothing is downloaded; the text
depends only on the Python installation (measured on CPython 3.11.7: about
0.5 MB, see ``corpus_info()``).  It is tokenized as UTF-8 bytes (vocab 256);
the first 90% is training data, the last 10% validation.

Two models:

* ``text_llama`` -- ``transformers.LlamaForCausalLM`` (hidden 128, 4 layers,
  4 heads, MLP 256, RoPE, 256 positions, untied embeddings);
* ``text_gpt2`` -- ``transformers.GPT2LMHeadModel`` (n_embd 128, 4 layers,
  4 heads, MLP 256, 256 learned positions, tied embeddings; its projections
  are ``transformers`` ``Conv1D`` modules, not ``nn.Linear``).

Both are trained with AdamW on random windows of ``CONTEXT`` + 1 bytes for a
fixed number of steps with fixed seeds.

Usage::

    from benchmarks.models import text_lm
    model, (train_ids, val_ids) = text_lm.get_model("text_llama")
    print(text_lm.perplexity(model, val_ids))

``get_model`` loads ``benchmarks/models/checkpoints/<name>.pt`` (a plain
``state_dict``) when present and otherwise trains the model (seed 0) and saves
it there.  `python -m benchmarks.models.train_all` (re)trains them and prints metrics.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.models import checkpoints as _ckpt
from benchmarks.models.checkpoints import CHECKPOINT_DIR  # noqa: F401  (train_all reads it here)


# Fixed module list (kept sorted).  Changing it changes the corpus.
MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "collections",
    "concurrent.futures", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "email.message", "enum", "fractions", "functools",
    "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "zipfile",
)

VAL_FRACTION = 0.1
VOCAB_SIZE = 256
CONTEXT = 128          # training / default evaluation window
MAX_POSITIONS = 256
STEPS = 600            # default number of training steps
BATCH_SIZE = 16
LR = 3e-3
WARMUP = 30

MODEL_NAMES = ("text_llama", "text_gpt2")
_ALIASES = {"llama": "text_llama", "gpt2": "text_gpt2"}


# ------------------------------------------------------------------------- corpus

def _defined_in(obj, modname: str) -> bool:
    """Whether ``obj`` belongs to ``modname`` (or its C accelerator / submodules)."""
    mod = getattr(obj, "__module__", None)
    if not isinstance(mod, str):
        return False
    last = modname.rsplit(".", 1)[-1]
    return mod == modname or mod.startswith(modname + ".") or mod.lstrip("_") == last


def _module_docs(modname: str) -> list[str]:
    module = importlib.import_module(modname)
    docs: list[str] = []

    def add(obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            docs.append(inspect.cleandoc(doc))

    add(module)
    members = vars(module)
    for name in sorted(members):
        if name.startswith("_"):
            continue
        obj = members[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if not _defined_in(obj, modname):
            continue
        add(obj)
        if inspect.isclass(obj):
            attrs = vars(obj)
            for aname in sorted(attrs):
                if aname.startswith("_") and aname != "__init__":
                    continue
                a = attrs[aname]
                if isinstance(a, (staticmethod, classmethod)):
                    a = a.__func__
                elif isinstance(a, property):
                    a = a.fget
                if inspect.isfunction(a) or inspect.ismethoddescriptor(a) or inspect.isbuiltin(a):
                    add(a)
    return docs


@functools.lru_cache(maxsize=1)
def corpus_text() -> str:
    """The full corpus as one string (deterministic for a given Python install)."""
    seen: set[str] = set()
    parts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. typing.io / typing.re deprecations
        for modname in MODULES:
            for doc in _module_docs(modname):
                if doc not in seen:
                    seen.add(doc)
                    parts.append(doc)
    return "\n\n".join(parts) + "\n"


@functools.lru_cache(maxsize=1)
def _corpus_bytes() -> bytes:
    return corpus_text().encode("utf-8")


def corpus_info() -> dict:
    """Size and SHA-256 of the corpus bytes (to check that two machines agree)."""
    import sys

    data = _corpus_bytes()
    return {
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "python": sys.version.split()[0],
        "modules": len(MODULES),
    }


def load_corpus():
    """Return ``(train_ids, val_ids)``: int64 byte ids; the last 10% is validation."""
    ids = torch.frombuffer(bytearray(_corpus_bytes()), dtype=torch.uint8).to(torch.int64)
    n_train = int(len(ids) * (1 - VAL_FRACTION))
    return ids[:n_train].clone(), ids[n_train:].clone()


def unigram_perplexity(train_ids: torch.Tensor, ids: torch.Tensor) -> float:
    """Perplexity of ``ids`` under the add-one-smoothed byte unigram model of ``train_ids``."""
    counts = torch.bincount(train_ids, minlength=VOCAB_SIZE).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-logp[ids].mean().item())


def bigram_perplexity(train_ids: torch.Tensor, ids: torch.Tensor) -> float:
    """Perplexity of ``ids[1:]`` under the add-one-smoothed byte bigram model of ``train_ids``."""
    pairs = train_ids[:-1] * VOCAB_SIZE + train_ids[1:]
    counts = torch.bincount(pairs, minlength=VOCAB_SIZE * VOCAB_SIZE).double().view(
        VOCAB_SIZE, VOCAB_SIZE) + 1.0
    logp = torch.log(counts / counts.sum(1, keepdim=True))
    return math.exp(-logp[ids[:-1], ids[1:]].mean().item())


# ------------------------------------------------------------------------- models

def llama_config():
    """``LlamaConfig`` of ``text_llama``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def gpt2_config():
    """``GPT2Config`` of ``text_gpt2``."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=MAX_POSITIONS,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_llama():
    """An untrained ``text_llama``."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config())


def build_gpt2():
    """An untrained ``text_gpt2``."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel(gpt2_config())


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=x)
    return out if isinstance(out, torch.Tensor) else out.logits


# ----------------------------------------------------------------------- training

def _train_lm(model, train_ids, *, seed, steps, batch_size, context, lr, warmup,
              weight_decay=0.1, log_every=0):
    gen = torch.Generator().manual_seed(seed + 1)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    offsets = torch.arange(context + 1)
    high = len(train_ids) - context - 1
    model.train()
    for step in range(steps):
        starts = torch.randint(0, high, (batch_size,), generator=gen)
        w = train_ids[starts[:, None] + offsets]
        x, y = w[:, :-1], w[:, 1:]
        loss = F.cross_entropy(_logits(model, x).reshape(-1, VOCAB_SIZE), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"  step {step + 1}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    return model


def _trainer(build, name: str):
    """A `train(seed, steps, data, ...)` for one of the text models (same recipe for both)."""

    def train(seed: int = 0, steps: int = STEPS, data=None, *, batch_size: int = BATCH_SIZE,
              context: int = CONTEXT, lr: float = LR, log_every: int = 0):
        train_ids = (load_corpus() if data is None else data)[0]
        torch.manual_seed(seed)
        return _train_lm(build(), train_ids, seed=seed, steps=steps, batch_size=batch_size,
                         context=context, lr=lr, warmup=WARMUP, log_every=log_every)

    train.__name__ = f"train_{name.removeprefix('text_')}"
    train.__doc__ = f"Train ``{name}`` from scratch with a fixed seed; returns it in eval mode."
    return train


train_llama = _trainer(build_llama, "text_llama")
train_gpt2 = _trainer(build_gpt2, "text_gpt2")


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, context: int = CONTEXT,
               max_windows: int | None = None, batch_size: int = 32) -> float:
    """Byte-level perplexity of ``model`` on ``ids``.

    ``ids`` is cut into consecutive non-overlapping windows of ``context + 1``
    bytes (the remainder is dropped); within each window the model sees the
    first ``context`` bytes and is scored on predicting bytes 1..context.  With
    ``max_windows`` only that many windows, evenly spaced, are scored.
    Deterministic; runs the model in eval mode.
    """
    n_win = len(ids) // (context + 1)
    if n_win == 0:
        raise ValueError(f"need at least {context + 1} ids, got {len(ids)}")
    windows = ids[: n_win * (context + 1)].view(n_win, context + 1)
    if max_windows is not None and max_windows < n_win:
        pick = torch.linspace(0, n_win - 1, max_windows).round().long()
        windows = windows[pick]
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        w = windows[i:i + batch_size]
        logits = _logits(model, w[:, :-1]).float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += w[:, 1:].numel()
    model.train(was_training)
    return math.exp(nll / count)


# ---------------------------------------------------------------------- checkpoints

FAMILY = _ckpt.Family("text", builders={"text_llama": build_llama, "text_gpt2": build_gpt2},
                        trainers={"text_llama": train_llama, "text_gpt2": train_gpt2},
                        aliases=_ALIASES, load_data=load_corpus)
# get_model(name, retrain=False) -> (model, data); data is load_corpus()'s result
checkpoint_path, get_model, save = FAMILY.checkpoint_path, FAMILY.get_model, FAMILY.save
num_params = _ckpt.num_params
