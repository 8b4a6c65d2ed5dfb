"""kv_proj part 2: token-level KV selection for long-context decoding (TokenSelect), as a
Hugging Face attention function.

    effc.use_select_attention(model, top_k=256, initial=4, recent=64)
    model.generate(ids, ...)            # decode steps attend to at most 324 cached tokens

A decode step (one query token) whose cache is longer than initial + recent + top_k attends
to the first `initial` tokens, the last `recent`, and the `top_k` others with the highest head
soft vote (each head's softmax over q.k, summed over heads): effc.select_attention
(effc/kernels/select_attention.py, a Triton kernel on CUDA). Everything else (prefill, short
caches, padded batches with a mask) runs the library's SDPA attention unchanged, so with
top_k + initial + recent >= the cache length the model is exactly the original.
Why an attention function: the selection is a per-step decision over the cache the model's
Python code holds; transformers lets a model's attention be swapped by name, which works
eagerly and under torch.compile alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import effc.kernels.select_attention  # noqa: F401  (registers torch.ops.effc.select_*)
from effc.passes.kv_proj import SelectConfig

NAME = "effc_select"


def select_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: [B, H, L, D] in, [B, L, H, Dv] out."""
    cfg: SelectConfig | None = getattr(module, "effc_select", None)
    if (cfg is None or query.shape[2] != 1 or key.shape[2] <= cfg.budget
            or attention_mask is not None or dropout):
        if cfg is not None:
            module.effc_select_state = None  # a prefill starts a new sequence
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    if cfg.reuse is None or torch.compiler.is_compiling():
        out = torch.ops.effc.select_attention(query, key, value, scale, cfg.top_k,
                                              cfg.initial, cfg.recent)
    else:
        out = _with_reuse(module, cfg, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


@dataclasses.dataclass
class _Selection:
    """The last selection of an attention module (eager decoding only)."""

    query: torch.Tensor   # [B, H, D] unit vectors of the query it was reused or made for
    index: torch.Tensor   # [B, S] token indices
    length: int           # cache length it covers
    reused: int = 0       # steps that reused it (for the report)
    made: int = 0         # selections made


def _with_reuse(module, cfg: SelectConfig, query, key, value, scale: float) -> torch.Tensor:
    """TokenSelect's selection cache: while each head's query keeps cosine >= cfg.reuse with
    the previous step's (mean over heads, every sequence), attend to the previous selection plus
    the tokens written since."""
    b, t = key.shape[0], key.shape[2]
    unit = torch.nn.functional.normalize(query[:, :, 0].float(), dim=-1)
    state: _Selection | None = getattr(module, "effc_select_state", None)
    if state is not None and state.index.shape[0] == b and state.length <= t and \
            float((unit * state.query).sum(-1).mean(-1).min()) >= cfg.reuse:
        new = torch.arange(state.length, t, device=key.device).expand(b, -1)
        state.index = torch.cat([state.index, new], dim=1)
        state.query, state.length, state.reused = unit, t, state.reused + 1
        return torch.ops.effc.gather_attention(query, key, value, state.index, scale)
    index = torch.ops.effc.select_tokens(query, key, scale, cfg.top_k, cfg.initial, cfg.recent)
    made = state.made + 1 if state is not None else 1
    reused = state.reused if state is not None else 0
    module.effc_select_state = _Selection(unit, index, t, reused, made)
    return torch.ops.effc.gather_attention(query, key, value, index, scale)


def reuse_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(selections made, steps that reused one) over `model`'s attention modules since the
    last prefill."""
    states = [m.effc_select_state for m in model.modules()
              if getattr(m, "effc_select_state", None) is not None]
    return sum(s.made for s in states), sum(s.reused for s in states)


AttentionInterface.register(NAME, select_attention_forward)


def use_select_attention(model: torch.nn.Module, top_k: int = 256, initial: int = 4,
                         recent: int = 64, reuse: float | None = None) -> SelectConfig:
    """Make `model`'s decode steps attend to selected cached tokens (see the module
    docstring); `restore_attention(model)` undoes it. Returns the validated settings.

    `reuse` (a cosine, e.g. 0.9; eager only): a step whose queries all keep at least that
    cosine with the previous step's attends to the previous selection plus the tokens
    written since, without scoring the cache (TokenSelect's selection cache)."""
    cfg = SelectConfig(top_k, initial, recent, reuse)
    attentions = [m for m in model.modules() if hasattr(m, "num_key_value_groups")
                  or type(m).__name__.endswith("Attention")]
    if not attentions:
        raise ValueError(f"effc.use_select_attention: {type(model).__name__} has no "
                         f"transformers attention modules")
    for m in attentions:
        m.effc_select = cfg
    if not hasattr(model, "_effc_previous_attention"):
        model._effc_previous_attention = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    return cfg


def restore_attention(model: torch.nn.Module) -> None:
    """Undo use_select_attention."""
    previous = getattr(model, "_effc_previous_attention", None)
    if previous is None:
        return
    for m in model.modules():
        if hasattr(m, "effc_select"):
            del m.effc_select
            m.__dict__.pop("effc_select_state", None)
    model.set_attn_implementation(previous)
    del model._effc_previous_attention
