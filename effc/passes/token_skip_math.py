"""token_skip's math: the closed-form router, capacities as thresholds, routing quality.

The router predicts, from a token's block input x alone, how much the block changes it: the
target is ||f(x)||, the norm of the block's update. Why that target: a token whose update is
small loses little when the block skips it (its output is x + f(x) ~ x), and the norm is cheap
to record for every token; on a small Llama a ridge router on it matched the oracle that
knows the true norms (issue measurements). The fit is ridge regression on [x, 1] in closed
form (float64), which keeps the router a single dot product per token at run time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from effc.kernels.token_gather import route_count as kept_tokens

RIDGE = 1e-3  # ridge strength, relative to the mean diagonal of X^T X


@dataclasses.dataclass
class Router:
    """score(x) = x . weight + bias; fitted on `tokens` calibration tokens."""

    weight: torch.Tensor   # [d] float32
    bias: float
    r2: float              # coefficient of determination on the fitting tokens
    tokens: int

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1]).double() @ self.weight.double() + self.bias


def fit_router(x: torch.Tensor, target: torch.Tensor) -> Router:
    """Ridge regression of `target` [N] on [x, 1] (x: [N, d])."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = target.reshape(-1).double()
    feats = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    gram = feats.T @ feats
    lam = RIDGE * gram.diagonal()[:-1].mean().clamp_min(1e-12)
    reg = torch.full((gram.shape[0],), float(lam), dtype=gram.dtype, device=gram.device)
    reg[-1] = 0.0  # the bias is not shrunk
    coef = torch.linalg.solve(gram + torch.diag(reg), feats.T @ y)
    pred = feats @ coef
    var = (y - y.mean()).pow(2).sum()
    r2 = 1.0 - float((y - pred).pow(2).sum() / var) if var > 0 else 1.0
    return Router(coef[:-1].float(), float(coef[-1]), r2, int(y.numel()))


def load_routers(path: str, key: str = "token_skip.router") -> dict[str, Router]:
    """Trained routers from a file written by torch.save: {site name: {"weight": [d] tensor,
    "bias": number}}, site names as token_skip's report lists them. Read once per version of
    the file; a missing or malformed file is a ValueError naming the option `key`."""
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise ValueError(f"effc option {key!r}: expected 'fit' or the path of a router file, "
                         f"got {path!r} ({exc.strerror})") from None
    return {name: dataclasses.replace(r, weight=r.weight.clone())  # callers own their copy
            for name, r in _load_routers(path, stamp, key)}


@functools.lru_cache(maxsize=8)
def _load_routers(path: str, stamp: int, key: str) -> tuple[tuple[str, Router], ...]:
    expected = ("{site name: {'weight': 1-D float tensor, 'bias': number}}, as written by "
                "torch.save")
    try:  # real tensors: under Dynamo's tracing context torch.load would make fake ones
        with unset_fake_temporarily(), torch._guards.tracing(None):
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: say which option and what was expected
        raise ValueError(f"effc option {key!r}: {path!r} is not a router file "
                         f"({type(exc).__name__}: {exc}); expected {expected}") from None
    out = []
    for name, entry in (data.items() if isinstance(data, dict) else [(None, None)]):
        w = entry.get("weight") if isinstance(entry, dict) else None
        b = entry.get("bias", 0.0) if isinstance(entry, dict) else None
        if not isinstance(name, str) or not isinstance(w, torch.Tensor) or w.dim() != 1 or \
                not w.is_floating_point() or isinstance(b, bool) or \
                not isinstance(b, (int, float, torch.Tensor)) or \
                (isinstance(b, torch.Tensor) and b.numel() != 1):
            raise ValueError(f"effc option {key!r}: {path!r} holds "
                             f"{type(data).__name__ if name is None else repr(name)}, not a "
                             f"router; expected {expected}")
        out.append((name, Router(w.detach().float(), float(b), math.nan, 0)))
    return tuple(out)


def threshold(scores: torch.Tensor, capacity: float) -> float:
    """The score above which a fraction `capacity` of the calibration tokens lies (per-token
    routing: causal, so decoding can use it one token at a time). It sits halfway between
    the last token dropped and the first kept: a threshold equal to a calibration token's
    score would route that token either way on rounding noise (another graph of the same
    prompt, such as generate() without a cache, sums in another order)."""
    s = scores.reshape(-1).double().sort().values
    if capacity >= 1.0:
        return -math.inf
    if capacity <= 0.0:
        return math.inf
    drop = min(s.numel() - 1, max(0, s.numel() - kept_tokens(s.numel(), capacity)))
    return float(s[drop]) if drop == 0 else float((s[drop - 1] + s[drop]) / 2)


def overlap(scores: torch.Tensor, oracle: torch.Tensor, capacity: float) -> float:
    """Fraction of the oracle's top tokens (by true update norm) that the router also keeps,
    both taking a fraction `capacity` of all tokens."""
    k = kept_tokens(scores.numel(), capacity)
    if k == 0:
        return 1.0
    mine = set(scores.reshape(-1).topk(k).indices.tolist())
    theirs = set(oracle.reshape(-1).topk(k).indices.tolist())
    return len(mine & theirs) / k


def arank(maps: list[torch.Tensor]) -> float:
    """gamma-MoD's ARank of a layer: the mean over its recorded attention maps ([H, Tq, Tk])
    and heads of the rank of the map with its diagonal zeroed, over the number of queries.
    A low ARank means the heads attend in few patterns: the layer is redundant."""
    ranks = []
    for m in maps:
        a = m.double().clone()
        a.diagonal(dim1=-2, dim2=-1).zero_()
        ranks.append((torch.linalg.matrix_rank(a).double() / a.shape[-2]).mean())
    return float(torch.stack(ranks).mean()) if ranks else float("nan")


def per_sequence(index: torch.Tensor, batch: int, tokens: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Routed rows (flat indices into batch * tokens rows) as positions per sequence,
    [batch, K] with K the most any sequence routes: each sequence's routed positions in
    order, then, to fill its row, some of its skipped positions (distinct, so the scatter's
    indices stay unique). Returns (positions, weight [batch * K]: 1 routed, 0 filler, their
    flat indices [batch * K])."""
    routed = torch.zeros(batch * tokens, dtype=torch.bool, device=index.device)
    routed[index] = True
    routed = routed.view(batch, tokens)
    counts = routed.sum(1)
    k = int(counts.max()) if batch and tokens else 0
    at = torch.arange(tokens, device=index.device)
    positions = ((~routed).long() * tokens + at).argsort(dim=1)[:, :k]  # routed first
    weight = (torch.arange(k, device=index.device)[None] < counts[:, None]).float()
    flat = positions + torch.arange(batch, device=index.device)[:, None] * tokens
    return positions, weight.reshape(-1), flat.reshape(-1)


def select_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x's rows (dim -2) at `positions` [B, K], per sequence: x is [B or 1, ..., T, n]."""
    lead = (positions.shape[0],) + tuple(x.shape[1:-2])
    x = x.expand(*lead, *x.shape[-2:])
    at = positions.view(positions.shape[0], *([1] * (x.dim() - 3)), -1, 1)
    return x.gather(-2, at.expand(*lead, positions.shape[1], x.shape[-1]))


def select_along(x: torch.Tensor, axis: int, positions: torch.Tensor) -> torch.Tensor:
    """x's entries at `positions` [B, K] along `axis` (a token axis, neither the first, the
    batch's, B or 1, nor the last), per sequence."""
    return select_rows(x.movedim(axis, -2), positions).movedim(-2, axis)


def routed_positions(index: torch.Tensor, batch: int, tokens: int) -> torch.Tensor:
    """Top-k routing's flat row indices (ascending, equally many per sequence) as positions
    per sequence, [batch, K]."""
    offsets = torch.arange(batch, device=index.device)[:, None] * tokens
    return index.view(batch, -1) - offsets


def select_mask(mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """An attention mask [B or 1, H or 1, T or 1, T] of the routed tokens at `positions`
    [B, K] among themselves: their columns, and their rows where it has one per query."""
    b, k = positions.shape
    if mask.shape[-2] != 1:
        mask = select_rows(mask, positions)
    mask = mask.expand(b, *mask.shape[1:])
    cols = positions.view(b, *([1] * (mask.dim() - 2)), k)
    return mask.gather(-1, cols.expand(*mask.shape[:-1], k))


def causal_rows(positions: torch.Tensor, keys: int) -> torch.Tensor:
    """The causal mask of the queries at `positions` [B, K] over `keys` keys ([B, 1, K, keys],
    True where attended): query i sees keys 0..positions[i], the rows of
    scaled_dot_product_attention's is_causal mask that the routed queries keep."""
    return torch.arange(keys, device=positions.device) <= positions[:, None, :, None]


# Mixture-of-Depths proper at batch > 1: sequences route different numbers of tokens, but
# a cache tensor holds as many rows for each. A routed layer's cache keeps a row per token
# (so the model's mask, whose columns count the first layer's cache, fits it too); a token
# that does not go through the layer writes a marked row, which the layer hides on this and
# every later step, and so "writes no keys and values". The marker is in-band, so that the
# model's code, which traced the cache's shapes, sees the usual ones: a zero key, and a
# value whose first two entries in the first head are MARK and the rest zero. Harmless to
# any reader (a zero key, a near-zero value: never a NaN or an overflow), and no computed
# row holds it in practice (two entries equal to one odd constant, exactly).
MARK = -1.2345e-4


def routed_of(weight: torch.Tensor) -> torch.Tensor:
    """The rows of per_sequence's [batch * K] layout that hold routed tokens (weight 1), in
    the order of the routed flat indices (by sequence, then position)."""
    return weight.nonzero().view(-1)


def _seen(mask: torch.Tensor) -> torch.Tensor:
    """An attention mask as booleans (True: attended); additive masks hide with the dtype's
    minimum."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def spread_rows(rows: torch.Tensor, positions: torch.Tensor, weight: torch.Tensor,
                tokens: int, keys: bool) -> torch.Tensor:
    """A routed layer's new cache rows [B, H, tokens, d] from its K rows per sequence
    [B, H, K, d] at `positions` [B, K]: the routed rows at their tokens; every other row
    (a filler's, weight 0, or a token the layer skipped) a marked one: a zero key (`keys`),
    or a value marked with MARK."""
    b, h, _, d = rows.shape
    blank = rows.new_zeros(1, h, 1, d)
    if not keys:
        blank[0, 0, 0, :2] = MARK
    rows = torch.where(weight.view(b, 1, -1, 1) == 0, blank, rows)
    out = blank.expand(b, h, tokens, d).clone()
    return out.scatter(2, positions.view(b, 1, -1, 1).expand(b, h, -1, d), rows)


def marked_rows(values: torch.Tensor) -> torch.Tensor:
    """[B, L]: the rows of a routed layer's cached values [B, H, L, d] that hold the marker."""
    return (values[:, 0, :, :2] == torch.tensor(MARK, dtype=values.dtype)).all(-1)


def cached_rows_mask(mask: torch.Tensor | None, positions: torch.Tensor,
                     hidden: torch.Tensor, tokens: int) -> torch.Tensor:
    """The mask (True: attended) of a routed layer's queries at `positions` [B, K] over its
    L cached rows, the last `tokens` of them this call's: the model's mask's rows of those
    queries (its one row, at a decode step), or, where it has none, causal (a query sees
    the rows up to its own token); the marked rows (`hidden` [B, L]) hidden."""
    keys = hidden.shape[1]
    if mask is None:
        at = torch.arange(keys, device=positions.device)
        seen = at <= positions[:, None, :, None] + (keys - tokens)
    else:
        seen = _seen(mask)
        if seen.shape[-2] != 1:
            seen = select_rows(seen, positions)
    return seen & ~hidden[:, None, None, :]


def compact_rows_mask(mask: torch.Tensor | None, positions: torch.Tensor,
                      weight: torch.Tensor) -> torch.Tensor:
    """Without a cache: the mask (True: attended) of the K routed rows per sequence
    ([B, K] `positions`, routed first, in order, then fillers of `weight` 0) among
    themselves: causal in that order, the fillers hidden as keys, and the model's mask's
    part of those rows and columns where it has one."""
    b, k = positions.shape
    at = torch.arange(k, device=positions.device)
    seen = (at[None, :] <= at[:, None])[None, None] & (weight.view(b, 1, 1, k) != 0)
    return seen if mask is None else seen & select_mask(_seen(mask), positions)
