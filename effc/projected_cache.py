"""A Hugging Face KV cache that stores fewer dimensions per head (kv_proj, MatryoshkaKV-style).

Why a cache object and not only a graph rewrite: under torch.compile, Dynamo traces the
model's Python with the original head size, and each decode step concatenates the new keys to
the cached ones in Python. A graph that returned narrower keys would make the next trace fail.
So the projection lives where the cache is written: `ProjectedCache.update` stores K P_k and
V P_v (per layer and KV head) and hands attention K P_k P_k^T and V P_v P_v^T. The cache really
shrinks (its tensors are r wide), eagerly or compiled, and prefill attention sees exactly what
decoding will see, so a teacher-forced evaluation measures the compressed model.

    calib = effc.calibrate(model, batches, what=("inputs", "kv"))
    cache = effc.kv_cache(model, calib, budget=0.5)     # or ratio=0.5, or the default bound
    out = model.generate(ids, cache=cache)
    cache.nbytes(), cache.dense_nbytes(), cache.summary()

Keys and values use PCA bases of the calibration's per-head moments of what the cache stores
(keys after RoPE: restored before attention, so the rotation needs no care). `keys="pairs"`
keeps whole RoPE rotation planes instead (dims i and i + d/2), the selection that commutes with
the rotation and so could fold into W_q/W_k; it measured worse than PCA on the Llama here.
`keys="latent"` (Palu) caches the keys before RoPE, projected on the PCA of W_k x, and rotates
them back at rebuild. Ranks are uniform across a layer's heads (the cache
tensors stay rectangular), chosen per layer and per K/V by `ratio`, a `budget` of cache bytes
(the shared allocator, each layer's own energy error as the data-free proxy), or by default the
least rank keeping `min_energy` of each layer's energy. With `center` (the default, where the
calibration recorded the means) PCA keys and values are centered: the cache stores
(K - mu_k) P_k and hands attention (K - mu_k) P_k P_k^T + mu_k (never more error at equal rank).
Latent and pair keys are not centered: the calibration records the keys after RoPE, whose mean
is not the latent keys', and a mean would not commute with the rotation of whole planes.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

from effc.compiler.log import logger
from effc.passes.budget import PROBE_ERROR, Candidate, db
from effc.passes.kv_proj import KVProjConfig
from effc.passes.kv_proj_math import (choose_ranks, pca_basis, pca_errors, plane_errors,
                                      plane_scores, plane_selection, query_plane_energy,
                                      rank_options)
from effc.passes.residual_sites import layer_index


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class _Projecting:
    """What a projected cache layer does on top of transformers' layer: store K P_k, V P_v
    ([B, G, T, r] instead of [B, G, T, d]) and hand attention K P_k P_k^T, V P_v P_v^T.

    With `rotary` (keys="latent", Palu's way) the key basis applies before RoPE: an incoming
    key is rotated back to k = W_k x (the rotation of its position undone), stored as k P, and
    rebuilt as RoPE(L P^T) at its position. The layer then also keeps each token's position
    id ([B, T] int64), since a batch's positions need not be the cache's slot numbers."""

    def _bases(self, key_basis: torch.Tensor | None, value_basis: torch.Tensor | None,
               rotary: torch.nn.Module | None, key_mean: torch.Tensor | None = None,
               value_mean: torch.Tensor | None = None) -> None:
        self.key_basis, self.value_basis = key_basis, value_basis  # [G, d, r] or None
        self.rotary = rotary if key_basis is not None else None
        # [G, 1, d] or None: subtracted before the projection, added back at rebuild
        self.key_mean = _per_head(key_mean) if key_basis is not None else None
        self.value_mean = _per_head(value_mean) if value_basis is not None else None
        self.positions: torch.Tensor | None = None

    def _setup(self) -> dict[str, Any]:
        """What a fresh layer with the same projection takes."""
        return dict(key_basis=self.key_basis, value_basis=self.value_basis, rotary=self.rotary,
                    key_mean=self.key_mean, value_mean=self.value_mean)

    def _rope(self, like: torch.Tensor, positions: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(like, position_ids=positions)
        return cos[:, None].to(like.dtype), sin[:, None].to(like.dtype)  # [B, 1, T, d]

    @staticmethod
    def _down(x: torch.Tensor, basis: torch.Tensor | None, mean: torch.Tensor | None = None
              ) -> torch.Tensor:
        if basis is None:
            return x
        if mean is not None:
            x = x - mean.to(x.device, x.dtype)
        return x @ basis.to(x.device, x.dtype)

    @staticmethod
    def _up(x: torch.Tensor, basis: torch.Tensor | None, mean: torch.Tensor | None = None
            ) -> torch.Tensor:
        if basis is None:
            return x
        x = x @ basis.to(x.device, x.dtype).transpose(-1, -2)
        return x if mean is None else x + mean.to(x.device, x.dtype)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor, kwargs: dict,
               start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(K P_k, V P_v, the new tokens' position ids when keys are latent); `start`: how
        many tokens the layer holds already."""
        new = None
        if self.rotary is not None:
            new = _positions(key_states, start, kwargs)
            cos, sin = self._rope(key_states, new)
            # undo RoPE: R^T k / |R|^2 (cos^2 + sin^2 is the rotation's scale squared)
            key_states = (key_states * cos - _rotate_half(key_states) * sin) / (cos * cos +
                                                                                 sin * sin)
        return (self._down(key_states, self.key_basis, self.key_mean),
                self._down(value_states, self.value_basis, self.value_mean), new)

    def _read(self, keys: torch.Tensor, values: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full-width keys and values attention reads, from the stored ones."""
        keys = self._up(keys, self.key_basis, self.key_mean)
        if self.rotary is not None:
            cos, sin = self._rope(keys, self.positions)
            keys = keys * cos + _rotate_half(keys) * sin
        return keys, self._up(values, self.value_basis, self.value_mean)


class ProjectedLayer(_Projecting, DynamicLayer):
    """A DynamicLayer whose tensors are projected (see _Projecting)."""

    def __init__(self, key_basis: torch.Tensor | None, value_basis: torch.Tensor | None,
                 rotary: torch.nn.Module | None = None, *, key_mean: torch.Tensor | None = None,
                 value_mean: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._bases(key_basis, value_basis, rotary, key_mean, value_mean)

    def fresh(self) -> ProjectedLayer:
        return ProjectedLayer(**self._setup())

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start = 0 if self.positions is None else self.positions.shape[-1]
        k, v, new = self._store(key_states, value_states, kwargs, start)
        if new is not None:
            self.positions = new if self.positions is None else torch.cat(
                [self.positions, new], dim=-1)
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        self.keys = torch.cat([self.keys, k], dim=-2)
        self.values = torch.cat([self.values, v], dim=-2)
        return self._read(self.keys, self.values)


class ProjectedStaticLayer(_Projecting, StaticLayer):
    """A StaticLayer whose preallocated tensors are projected: [B, G, max_cache_len, r]."""

    def __init__(self, key_basis: torch.Tensor | None, value_basis: torch.Tensor | None,
                 rotary: torch.nn.Module | None = None, *, max_cache_len: int,
                 key_mean: torch.Tensor | None = None, value_mean: torch.Tensor | None = None,
                 **kwargs: Any):
        super().__init__(max_cache_len=max_cache_len, **kwargs)
        self._bases(key_basis, value_basis, rotary, key_mean, value_mean)

    def fresh(self) -> ProjectedStaticLayer:
        return ProjectedStaticLayer(**self._setup(), max_cache_len=self.max_cache_len)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.cumulative_length) if self.is_initialized else 0
        k, v, new = self._store(key_states, value_states, kwargs, start)
        if new is not None:
            if self.positions is None:
                self.positions = torch.zeros(new.shape[0], self.max_cache_len,
                                             dtype=torch.int64, device=new.device)
            slots = torch.arange(start, start + new.shape[1], device=new.device)
            self.positions.index_copy_(1, slots, new)
        keys, values = StaticLayer.update(self, k, v)
        return self._read(keys, values)


def _per_head(mean: torch.Tensor | None) -> torch.Tensor | None:
    """A per-KV-head mean [G, d] (or [G, 1, d]) as [G, 1, d] float32, broadcasting over the
    cache's [B, G, T, d]."""
    return None if mean is None else mean.reshape(mean.shape[0], 1, mean.shape[-1]).float()


def _positions(key_states: torch.Tensor, start: int, kwargs: dict) -> torch.Tensor:
    """The position ids [B, T_new] of incoming keys: the attention's `position_ids` when the
    model passes them on to the cache (transformers' Llama family does), else the slots after
    the `start` cached ones."""
    pos = kwargs.get("kwargs", {}).get("position_ids") if isinstance(
        kwargs.get("kwargs"), dict) else None
    pos = pos if pos is not None else kwargs.get("position_ids")
    bsz, tokens = key_states.shape[0], key_states.shape[2]
    if pos is None:
        pos = torch.arange(start, start + tokens, device=key_states.device)
    return pos.to(key_states.device, torch.int64).expand(bsz, tokens)


class ProjectedCache(Cache):
    """A transformers Cache of ProjectedLayers: `model.generate(ids, cache=c)`, or a forward
    (`model(ids, cache=c)`)."""

    def __init__(self, layers: list[ProjectedLayer], plan: list[dict[str, Any]],
                 head_dim: int):
        super().__init__(layers=layers)
        self.plan, self.head_dim = plan, head_dim
        self.measured_sqnr_db: float | None = None  # logits SQNR on the batches, if given

    def fresh(self) -> ProjectedCache:
        """An empty cache with the same bases and ranks (one per generate() call)."""
        out = ProjectedCache([layer.fresh() for layer in self.layers], self.plan, self.head_dim)
        out.measured_sqnr_db = self.measured_sqnr_db
        return out

    def nbytes(self) -> int:
        """Bytes the cache's key and value tensors hold now (and latent keys' position ids)."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for t in (layer.keys, layer.values, layer.positions)
                   if isinstance(t, torch.Tensor))

    def dense_nbytes(self) -> int:
        """Bytes a full-width cache would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            for t in (layer.keys, layer.values):
                if isinstance(t, torch.Tensor) and t.numel():
                    total += t.numel() // t.shape[-1] * self.head_dim * t.element_size()
        return total

    def summary(self) -> list[dict[str, Any]]:
        """Per layer: the key and value ranks and their own errors (data-free proxies)."""
        return [dict(p) for p in self.plan]


def _attention_modules(calibration) -> dict[int, str]:
    """layer index -> attention module path, from the calibration's per-head K/V moments."""
    out = {}
    for name in calibration.keys:
        if layer_index(name) is not None:
            out[layer_index(name)] = name
    return out


def _weight_modules(model: torch.nn.Module) -> dict[int, str]:
    """layer index -> path of each attention module with k_proj and v_proj linears, or with
    GPT-2's fused c_attn (a Conv1D: weight [in, 3 * embed], queries, keys, values in turn)."""
    out = {}
    for name, m in model.named_modules():
        split = isinstance(getattr(m, "k_proj", None), torch.nn.Linear) and \
            isinstance(getattr(m, "v_proj", None), torch.nn.Linear)
        fused = type(getattr(m, "c_attn", None)).__name__ == "Conv1D" and \
            getattr(m, "c_attn").weight.shape[1] == 3 * getattr(m, "embed_dim", -1)
        if (split or fused) and layer_index(name) is not None:
            out[layer_index(name)] = name
    return out


def _kv_projections(params: dict, module: str) -> list[tuple[torch.Tensor, torch.Tensor | None,
                                                             str]]:
    """The key and value projections of an attention module: (weight [out, in], bias or None,
    the name its input moment is recorded under), from k_proj/v_proj or from the key and
    value thirds of a fused c_attn."""
    if f"{module}.k_proj.weight" in params:
        return [(params[f"{module}.{p}.weight"].detach(), params.get(f"{module}.{p}.bias"),
                 f"{module}.{p}.weight") for p in ("k_proj", "v_proj")]
    w = params[f"{module}.c_attn.weight"].detach()  # [in, 3 * embed]: x @ w
    b = params.get(f"{module}.c_attn.bias")
    e = w.shape[1] // 3
    return [(w[:, i * e:(i + 1) * e].T, None if b is None else b[i * e:(i + 1) * e],
             f"{module}.c_attn.weight") for i in (1, 2)]


def _rotary(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's rotary embedding module (its forward(x, position_ids) gives cos, sin)."""
    return next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")),
                None)


def _key_mode(config: KVProjConfig, model: torch.nn.Module, rotary: torch.nn.Module | None,
              weights: dict[int, str], layers_n: int) -> str:
    """The keys knob resolved: "auto" is latent (before RoPE) where the model has RoPE and
    k_proj/v_proj linears in every layer (on the Llama trained here: 0.974 next-token
    agreement at half the cache's bytes, 0.958 with PCA after RoPE), else pca. "latent"
    without either is a ValueError."""
    every = sorted(weights) == list(range(layers_n))
    if config.keys == "auto":
        return "latent" if rotary is not None and every else "pca"
    if config.keys == "latent" and rotary is None:
        raise ValueError(f"effc option 'kv_proj.keys': 'latent' caches keys before RoPE, but "
                         f"{type(model).__name__} has no rotary embedding module; use 'pca'")
    if config.keys == "latent" and not every:
        raise ValueError("effc option 'kv_proj.keys': 'latent' needs k_proj/v_proj linears in "
                         "every layer (the keys before RoPE are W_k x)")
    return config.keys


def _weight_moment_pair(params: dict, module: str, config, calibration, rotated: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free per-KV-head second moments of the cached keys and values: W C W^T per head
    (C: the projection input's recorded moment, else the identity) plus the bias's b b^T.
    Under RoPE the cached keys are rotated by position-dependent angles; averaged over
    positions, each rotation plane (dims i, i + d/2) keeps its energy, split evenly between
    its two dims, and planes decorrelate, so the key moment becomes that diagonal
    (`rotated=False`: the keys before RoPE, W_k x, whose moment W_k C W_k^T is exact)."""
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    moments = []
    for weight, bias, input_name in _kv_projections(params, module):
        w = weight.double().cpu()
        c = calibration.input_moment(input_name) if calibration else None
        wc = w @ c.double() if c is not None else w
        g = w.shape[0] // d
        full = wc @ w.T
        m = torch.stack([full[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(g)])
        if bias is not None:
            b = bias.detach().double().cpu().reshape(g, d)
            m = m + b[:, :, None] * b[:, None, :]
        moments.append(m)
    keys, values = moments
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None)
    if rope and rotated:
        diag = keys.diagonal(dim1=-2, dim2=-1)
        plane = (diag[:, : d // 2] + diag[:, d // 2:]) / 2
        keys = torch.diag_embed(torch.cat([plane, plane], dim=-1))
    return keys, values


def _centering(config: KVProjConfig, from_weights: bool, mode: str) -> set[str]:
    """Which of keys and values get centered: PCA keys and values, where the calibration
    recorded their means. center=True where none can be is a ValueError; keys it cannot
    center (latent, pairs) get a warning."""
    if config.center is False:
        return set()
    if from_weights:
        if config.center is True:
            raise ValueError("effc option 'kv_proj.center': True needs the calibration's "
                             "key/value means (bases from calibration: effc.calibrate(model, "
                             "batches, what=('inputs', 'kv'))); data-free bases are not centered")
        return set()
    if config.center is True and mode in ("latent", "pairs"):
        logger.warning("kv_proj: center=True centers the values only: %s keys are not "
                       "centered (the calibration's key mean is taken after RoPE)", mode)
    return {"values"} | ({"keys"} if mode == "pca" else set())


def kv_cache(model: torch.nn.Module, calibration=None, config: KVProjConfig | None = None, *,
             batches: list | None = None, max_cache_len: int | None = None,
             **knobs: Any) -> ProjectedCache:
    """A ProjectedCache for `model` from `effc.calibrate(model, batches, what=("inputs",
    "kv"))`, or data-free from its weights (no calibration, or bases="weights"); knobs as
    KVProjConfig's (ValueError naming a bad one).

    `batches` (a few, in the form calibrate takes): a `budget` then weighs each layer's
    keys and values by their measured effect on the logits over these batches (one forward
    per site and batch, plus one to check), instead of the layers' own energy errors.
    `max_cache_len`: a static cache instead (transformers' StaticCache, for compiled decoding
    without recompiles): its tensors are preallocated for that many tokens, r wide."""
    if max_cache_len is not None and (isinstance(max_cache_len, bool) or not isinstance(
            max_cache_len, int) or max_cache_len < 1):
        raise ValueError(f"effc.kv_cache: max_cache_len must be a positive int (tokens), got "
                         f"{max_cache_len!r}")
    if config is None:
        from effc.compiler.config import parse_fields

        config = parse_fields(KVProjConfig, knobs, prefix="kv_proj.")
    elif knobs:
        raise ValueError("effc.kv_cache: give a KVProjConfig or knobs, not both")
    recorded = calibration is not None and bool(calibration.keys)
    if config.bases == "calibration" and not recorded:
        raise ValueError("effc option 'kv_proj.bases': 'calibration' needs key/value moments; "
                         "calibrate with effc.calibrate(model, batches, what=('inputs', 'kv'))")
    from_weights = config.bases == "weights" or not recorded
    text = model.config.get_text_config(decoder=True)
    layers_n = text.num_hidden_layers
    heads = text.num_attention_heads
    weights = _weight_modules(model)
    rotary = _rotary(model)
    mode = _key_mode(config, model, rotary, weights, layers_n)
    if mode != "latent":
        rotary = None
    mods = weights if from_weights else _attention_modules(calibration)
    missing = [i for i in range(layers_n) if i not in mods]
    if missing:
        where = ("attention modules with k_proj/v_proj or a fused c_attn (data-free bases)"
                 if from_weights else "key/value moments in the calibration")
        raise ValueError(f"effc.kv_cache: no {where} for layers {missing}; "
                         f"calibrate with effc.calibrate(model, batches, what=('inputs', 'kv'))")
    params = dict(model.named_parameters())
    size = next(model.parameters()).element_size()
    options, facts = [], {}
    centering = _centering(config, from_weights, mode)
    for i in range(layers_n):
        kmean = vmean = None
        if from_weights:
            kmom, vmom = _weight_moment_pair(params, mods[i], text, calibration)
        else:
            km, vm = calibration.keys[mods[i]], calibration.values[mods[i]]
            kmom, vmom = km.moment(), vm.moment()
            kmean = km.mean() if "keys" in centering else None
            vmean = vm.mean() if "values" in centering else None
        if mode == "latent":  # the keys before RoPE: W_k C W_k^T, C the input's moment
            kmom = _weight_moment_pair(params, weights[i], text, calibration, rotated=False)[0]
        g, d = kmom.shape[0], kmom.shape[-1]
        scores = None
        if mode == "pairs":
            wq = params.get(f"{mods[i]}.q_proj.weight")
            qe = None
            if wq is not None and wq.shape[0] == heads * d:
                inp = calibration.input_moment(f"{mods[i]}.q_proj.weight") \
                    if calibration is not None else None
                qe = query_plane_energy(wq.detach().cpu(), inp, heads, g)
            scores = plane_scores(kmom, qe)
        facts[i] = (kmom, vmom, scores, g, d, kmean, vmean)
        if mode == "pairs":  # ranks are whole planes: 2 dims each
            options.append(rank_options(f"{i}.k", plane_errors(scores), d, g,
                                    max(2, config.multiple), size, per=2))
        elif mode in ("pca", "latent"):
            options.append(rank_options(f"{i}.k", pca_errors(kmom, kmean), d, g, config.multiple,
                                    size,
                                    extra=8 if mode == "latent" else 0))
        if config.values:
            options.append(rank_options(f"{i}.v", pca_errors(vmom, vmean), d, g, config.multiple,
                                    size))
    build = lambda choice: _build(choice, facts, mode, mods, layers_n, rotary)  # noqa: E731
    measure = _logit_error(model, batches, build) if batches else None
    if measure is not None and config.budget is not None:
        for site in options:  # end-to-end sensitivity from one probe candidate per site
            lossy = [c for c in site.candidates if c.error > 0]
            if lossy:
                near = [c for c in lossy if c.error <= PROBE_ERROR]
                probe = min(near, key=lambda c: c.bytes) if near else min(
                    lossy, key=lambda c: c.error)
                site.sensitivity = measure({site.key: probe}) / probe.error ** 2
                site.measured = True
    choice = choose_ranks(options, config)
    cache = build(choice)
    if max_cache_len is not None:
        cache = ProjectedCache([ProjectedStaticLayer(**layer._setup(),
                                                     max_cache_len=max_cache_len)
                                for layer in cache.layers], cache.plan, cache.head_dim)
    if measure is not None:
        cache.measured_sqnr_db = db(measure(choice))
        for row in cache.plan:
            row["sensitivity"] = {s.key[-1]: round(s.sensitivity, 4) for s in options
                                  if s.key.split(".")[0] == str(row["layer"])}
    return cache


def _logit_error(model, batches, build):
    """A function: choice -> squared relative error of the logits over `batches` with a cache
    built from that choice (the references computed once, without any cache)."""
    def call(batch, cache=None):
        kw = {"use_cache": True, "cache": cache} if cache is not None else {"use_cache": False}
        out = model(**batch, **kw) if isinstance(batch, dict) else model(batch, **kw)
        return (out.logits if hasattr(out, "logits") else out[0]).double()

    with torch.no_grad():
        refs = [call(b) for b in batches]

    def error2(choice) -> float:
        num = den = 0.0
        with torch.no_grad():
            for b, ref in zip(batches, refs):
                out = call(b, build(choice))
                num += (out - ref).pow(2).sum().item()
                den += ref.pow(2).sum().item()
        return num / den if den > 0 else 0.0

    return error2


def _build(choice: dict[str, Candidate], facts, mode: str, mods: dict[int, str],
           layers_n: int, rotary: torch.nn.Module | None = None) -> ProjectedCache:
    """The cache for one choice of ranks (a site missing from `choice` is kept whole)."""
    layers, plan = [], []
    for i in range(layers_n):
        kmom, vmom, scores, g, d, kmean, vmean = facts[i]
        kc, vc = choice.get(f"{i}.k"), choice.get(f"{i}.v")
        rk = kc.choice if kc is not None else d
        rv = vc.choice if vc is not None else d
        kb = None if rk >= d else (plane_selection(scores, rk // 2) if mode == "pairs"
                                   else pca_basis(kmom, rk, kmean))
        vb = None if rv >= d else pca_basis(vmom, rv, vmean)
        layers.append(ProjectedLayer(kb, vb, rotary, key_mean=kmean, value_mean=vmean))
        plan.append({"layer": i, "module": mods[i], "keys": mode if kb is not None else "full",
                     "key_rank": rk, "value_rank": rv, "head_dim": d, "kv_heads": g,
                     "centered": [w for w, b, m in (("keys", kb, kmean), ("values", vb, vmean))
                                  if b is not None and m is not None],
                     "key_error": 0.0 if kc is None else round(kc.error, 6),
                     "value_error": 0.0 if vc is None else round(vc.error, 6)})
    return ProjectedCache(layers, plan, facts[0][4])


__all__ = ["KVProjConfig", "ProjectedCache", "ProjectedLayer", "ProjectedStaticLayer", "kv_cache"]
