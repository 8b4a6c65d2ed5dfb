"""Token-level KV selection for long-context decoding (TokenSelect).

A decode step attends one query per sequence to a KV cache of T tokens. Most of the softmax
mass sits on few tokens, so attending only those (plus the first ``initial`` tokens, the
attention sinks, and the last ``recent`` ones, the local window) keeps the output close while
reading S << T value rows. Which tokens: TokenSelect's head soft-vote, each query head's
softmax over all T tokens summed across heads, so a token counts by the attention mass it
draws in every head and no single head's large logits dominate.

``effc::select_tokens`` returns the chosen indices [B, S] (ascending; S = min(T, initial +
recent + top_k), every token when the budget covers T), ``effc::gather_attention`` attends to
the given indices, and ``effc::select_attention`` is the two composed. Ops, so a compiled graph
keeps them as single calls: the fake implementations state S exactly (min(T, budget), a
symbolic Min for a symbolic T: no data-dependent size, so a decode loop whose cache length T
changes every step compiles once, without a graph break), and CUDA runs the Triton kernels of
select_attention_triton.py. The torch references here are the CPU path and the test oracle.

Shapes: q [B, H, 1, D], k [B, G, T, D], v [B, G, T, Dv], G dividing H; query head h reads KV
head h // (H // G) (grouped-query attention, nothing repeated). Any float dtypes; everything is
computed in fp32 and the attention output is rounded once to v's dtype. Indices must lie in
[0, T): the references raise on others, the kernel does not check them. Zero selected tokens
(S = 0) give a zero output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from effc.kernels.low_rank import lazy_triton
from effc.kernels.ordering import stable_top_k


def select_count(tokens: int, top_k: int, initial: int, recent: int) -> int:
    """S: the tokens select_tokens keeps per sequence, min(T, initial + recent + top_k)."""
    return min(tokens, initial + recent + top_k)


def _check_qk(name: str, q: Tensor, k: Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != 1 or q.shape[0] != k.shape[0] or \
            q.shape[3] != k.shape[3] or k.shape[1] == 0 or q.shape[1] % k.shape[1] or \
            not q.is_floating_point() or not k.is_floating_point() or q.device != k.device:
        raise ValueError(f"{name} expects float q [B, H, 1, D] and k [B, G, T, D] on one device "
                         f"with G dividing H; got q {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"k {tuple(k.shape)} {k.dtype} on {k.device}")


def _check_budget(top_k: int, initial: int, recent: int) -> None:
    if min(top_k, initial, recent) < 0:
        raise ValueError(f"select_tokens: top_k, initial and recent must be >= 0; got "
                         f"top_k={top_k}, initial={initial}, recent={recent}")


def _check_gather(q: Tensor, k: Tensor, v: Tensor, index: Tensor) -> None:
    _check_qk("gather_attention", q, k)
    if v.dim() != 4 or v.shape[:3] != k.shape[:3] or not v.is_floating_point() or \
            v.device != k.device:
        raise ValueError(f"gather_attention expects float v [B, G, T, Dv] beside k "
                         f"{tuple(k.shape)}; got v {tuple(v.shape)} {v.dtype} on {v.device}")
    if index.dim() != 2 or index.dtype != torch.int64 or index.shape[0] != q.shape[0] or \
            index.device != q.device:
        raise ValueError(f"gather_attention expects an int64 index [B, S] on q's device; got "
                         f"{index.dtype} {tuple(index.shape)} on {index.device}")


def score_logits_reference(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale * q[b, h, 0] . k[b, h // (H // G), t] in fp32, as [B, H, T]."""
    _check_qk("select_tokens", q, k)
    (bsz, heads, _, dim), groups = q.shape, k.shape[1]
    qf = q.float().reshape(bsz, groups, heads // groups, dim)           # head h -> (h // R, h % R)
    logits = scale * (qf @ k.float().transpose(-1, -2))                  # [B, G, R, T]
    return logits.reshape(bsz, heads, k.shape[2])


def soft_votes(logits: Tensor) -> Tensor:
    """The head soft-vote [B, T] of logits [B, H, T]: softmax over T per head, summed over heads
    (fp32)."""
    return torch.softmax(logits.float(), dim=-1).sum(dim=1)


def select_from_votes(votes: Tensor, top_k: int, initial: int, recent: int) -> Tensor:
    """The indices [B, S] (int64, ascending) of select_tokens from the soft votes [B, T].

    The top_k tokens outside the first ``initial`` and last ``recent`` come from a stable
    descending sort (equal votes: the lower index first; NaN ranks above every number,
    torch.sort's order); torch.topk does not promise which of equal values it keeps."""
    _check_budget(top_k, initial, recent)
    bsz, tokens = votes.shape
    every = torch.arange(tokens, dtype=torch.int64, device=votes.device)
    if initial + recent + top_k >= tokens:
        return every.expand(bsz, tokens).contiguous()
    top = stable_top_k(votes[:, initial:tokens - recent], top_k) + initial
    head, tail = every[:initial], every[tokens - recent:]
    return torch.cat([head.expand(bsz, initial), top, tail.expand(bsz, recent)], dim=1)


def select_tokens_reference(q: Tensor, k: Tensor, scale: float, top_k: int, initial: int,
                            recent: int) -> Tensor:
    """Plain torch select_tokens: the CPU implementation and the Triton path's oracle."""
    _check_budget(top_k, initial, recent)
    return select_from_votes(soft_votes(score_logits_reference(q, k, scale)), top_k, initial,
                             recent)


def gather_attention_reference(q: Tensor, k: Tensor, v: Tensor, index: Tensor,
                               scale: float) -> Tensor:
    """softmax(scale * q . k[index]) @ v[index] per head, fp32, rounded to v's dtype:
    [B, H, 1, Dv]."""
    _check_gather(q, k, v, index)
    (bsz, heads, _, dim), groups, dv = q.shape, k.shape[1], v.shape[3]
    if bsz == 1:  # one index list: indexing copies whole rows (2x index_select on dim 2 and
        # gather: 15 vs 31 and 28 us for 324 of 1k-16k rows of 4 heads, 2-core CPU)
        ks, vs = k[:, :, index[0]].float(), v[:, :, index[0]].float()
    else:
        sel = index[:, None, :, None]
        ks = k.gather(2, sel.expand(-1, groups, -1, dim)).float()       # [B, G, S, D]
        vs = v.gather(2, sel.expand(-1, groups, -1, dv)).float()        # [B, G, S, Dv]
    qf = q.float().reshape(bsz, groups, heads // groups, dim)
    probs = torch.softmax(scale * (qf @ ks.transpose(-1, -2)), dim=-1)  # [B, G, R, S]
    return (probs @ vs).reshape(bsz, heads, 1, dv).to(v.dtype)


def _fake_index(q: Tensor, k: Tensor, top_k: int, initial: int, recent: int) -> Tensor:
    _check_qk("select_tokens", q, k)
    _check_budget(top_k, initial, recent)
    tokens = k.shape[2]   # an int, or a SymInt under dynamic shapes: then S = Min(T, budget)
    size = select_count(tokens, top_k, initial, recent) if isinstance(tokens, int) else \
        torch.sym_min(tokens, initial + recent + top_k)
    return q.new_empty((q.shape[0], size), dtype=torch.int64)


@torch.library.custom_op("effc::select_tokens", mutates_args=())
def _select_tokens(q: Tensor, k: Tensor, scale: float, top_k: int, initial: int,
                   recent: int) -> Tensor:
    return select_tokens_reference(q, k, scale, top_k, initial, recent)


_select_tokens.register_kernel("cuda")(
    lazy_triton("effc.kernels.select_attention_triton", "select_tokens_triton",
                select_tokens_reference))


@_select_tokens.register_fake
def _(q, k, scale, top_k, initial, recent):
    return _fake_index(q, k, top_k, initial, recent)


@torch.library.custom_op("effc::gather_attention", mutates_args=())
def _gather_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> Tensor:
    return gather_attention_reference(q, k, v, index, scale)


_gather_attention.register_kernel("cuda")(
    lazy_triton("effc.kernels.select_attention_triton", "gather_attention_triton",
                gather_attention_reference))


@_gather_attention.register_fake
def _(q, k, v, index, scale):
    _check_gather(q, k, v, index)
    return q.new_empty(q.shape[:3] + (v.shape[3],), dtype=v.dtype)


def select_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, top_k: int,
                               initial: int, recent: int) -> Tensor:
    """gather_attention_reference over select_tokens_reference's indices."""
    index = select_tokens_reference(q, k, scale, top_k, initial, recent)
    return gather_attention_reference(q, k, v, index, scale)


@torch.library.custom_op("effc::select_attention", mutates_args=())
def _select_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, top_k: int, initial: int,
                      recent: int) -> Tensor:
    return select_attention_reference(q, k, v, scale, top_k, initial, recent)


_select_attention.register_kernel("cuda")(
    lazy_triton("effc.kernels.select_attention_triton", "select_attention_triton",
                select_attention_reference))


@_select_attention.register_fake
def _(q, k, v, scale, top_k, initial, recent):
    _check_budget(top_k, initial, recent)
    _check_gather(q, k, v, q.new_empty((q.shape[0], 0), dtype=torch.int64))
    return q.new_empty(q.shape[:3] + (v.shape[3],), dtype=v.dtype)


def select_tokens(q: Tensor, k: Tensor, scale: float, top_k: int, initial: int = 0,
                  recent: int = 0) -> Tensor:
    """``effc::select_tokens``: the indices [B, S] of the tokens to attend (see the module
    docstring and select_from_votes)."""
    return torch.ops.effc.select_tokens(q, k, scale, top_k, initial, recent)


def gather_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, scale: float) -> Tensor:
    """``effc::gather_attention``: attention of q to the tokens ``index`` [B, S] only."""
    return torch.ops.effc.gather_attention(q, k, v, index, scale)


def select_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, top_k: int,
                     initial: int = 0, recent: int = 0) -> Tensor:
    """``effc::select_attention``: gather_attention over select_tokens' indices."""
    return torch.ops.effc.select_attention(q, k, v, scale, top_k, initial, recent)
