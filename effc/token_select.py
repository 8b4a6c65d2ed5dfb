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
    if cfg.reuse is None:
        out = torch.ops.effc.select_attention(query, key, value, scale, cfg.top_k,
                                              cfg.initial, cfg.recent)
    elif torch.compiler.is_compiling():  # the op keeps the state, by the module's identity
        out = torch.ops.effc.select_attention_reusing(query, key, value, scale, cfg.top_k,
                                                      cfg.initial, cfg.recent, cfg.reuse,
                                                      _slot(module))
    else:
        out = _with_reuse(module, cfg, query, key, value, scale)
    return out.transpose(1, 2).contiguous(), None


@dataclasses.dataclass
class _Selection:
    """The last selection of an attention module."""

    query: torch.Tensor   # [B, H, D] unit vectors of the query it was reused or made for
    index: torch.Tensor   # [B, S] token indices
    length: int           # cache length it covers
    reused: int = 0       # steps that reused it (for the report)
    made: int = 0         # selections made
    first: torch.Tensor | None = None  # compiled: the first cached key, [B, G, 1, D]


def _with_reuse(module, cfg: SelectConfig, query, key, value, scale: float) -> torch.Tensor:
    """Eager decoding: the module keeps its last selection (a prefill forgets it)."""
    out, module.effc_select_state = _select_or_reuse(
        getattr(module, "effc_select_state", None), cfg, query, key, value, scale)
    return out


def _select_or_reuse(state: _Selection | None, cfg: SelectConfig, query, key, value,
                     scale: float) -> tuple[torch.Tensor, _Selection]:
    """TokenSelect's selection cache: while each head's query keeps cosine >= cfg.reuse with
    the previous step's (mean over heads, every sequence), attend to the previous selection plus
    the tokens written since; else select afresh. The attention's output and the new state."""
    b, t = key.shape[0], key.shape[2]
    unit = torch.nn.functional.normalize(query[:, :, 0].float(), dim=-1)
    if state is not None and state.index.shape[0] == b and state.length <= t and \
            float((unit * state.query).sum(-1).mean(-1).min()) >= cfg.reuse:
        new = torch.arange(state.length, t, device=key.device).expand(b, -1)
        index = torch.cat([state.index, new], dim=1)
        return (torch.ops.effc.gather_attention(query, key, value, index, scale),
                _Selection(unit, index, t, state.reused + 1, state.made))
    index = torch.ops.effc.select_tokens(query, key, scale, cfg.top_k, cfg.initial, cfg.recent)
    made, reused = (state.made + 1, state.reused) if state is not None else (1, 0)
    return (torch.ops.effc.gather_attention(query, key, value, index, scale),
            _Selection(unit, index, t, reused, made))


# Compiled decoding (kv_proj's select with reuse): each rewritten attention's last selection,
# by the attention module's name. The graph holds the op, not the state, so the op keeps it.
_SLOTS: dict[str, _Selection] = {}


@torch.library.custom_op("effc::select_attention_reusing", mutates_args=())
def select_attention_reusing(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             scale: float, top_k: int, initial: int, recent: int, reuse: float,
                             slot: str) -> torch.Tensor:
    """effc.select_attention with the selection cache, for compiled graphs: the state of
    `slot` (an attention module's name) carries over to the same sequence's next step only
    (as many sequences, one more cached token, the same first cached key); anything else (a
    new prompt, another cache) selects afresh and restarts the slot's counts."""
    state, first = _SLOTS.get(slot), key[:, :, :1]
    if state is not None and not (state.length == key.shape[2] - 1
                                  and torch.equal(state.first, first)):
        state = None
    out, new = _select_or_reuse(state, SelectConfig(top_k, initial, recent, reuse), query, key,
                                value, scale)
    new.first = first.clone()
    _SLOTS[slot] = new
    return out


@select_attention_reusing.register_fake
def _(query, key, value, scale, top_k, initial, recent, reuse, slot):
    return query.new_empty(query.shape[:3] + (value.shape[3],), dtype=value.dtype)


def _slot(module: torch.nn.Module) -> str:
    return f"id:{id(module)}"


def forget_selections() -> None:
    """Drop the compiled graphs' selection states (effc.reset())."""
    _SLOTS.clear()


def reuse_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(selections made, steps that reused one) over `model`'s attention modules since the
    last prefill (compiled: since the sequence's first decode step)."""
    states = [m.effc_select_state for m in model.modules()
              if getattr(m, "effc_select_state", None) is not None]
    states += [_SLOTS[key] for name, m in model.named_modules()
               for key in (name, _slot(m)) if key in _SLOTS]
    return sum(s.made for s in states), sum(s.reused for s in states)


AttentionInterface.register(NAME, select_attention_forward)


def use_select_attention(model: torch.nn.Module, top_k: int = 256, initial: int = 4,
                         recent: int = 64, reuse: float | None = None) -> SelectConfig:
    """Make `model`'s decode steps attend to selected cached tokens (see the module
    docstring); `restore_attention(model)` undoes it. Returns the validated settings.

    `reuse` (a cosine, e.g. 0.9): a step whose queries all keep at least that cosine with the
    previous step's attends to the previous selection plus the tokens written since, without
    scoring the cache (TokenSelect's selection cache). Eagerly the attention module keeps the
    selection; compiled, effc.select_attention_reusing does."""
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
