"""Shared test models and test-only passes (registered per test with effc.passes.extra_passes)."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from effc.compiler.report import SiteRow
from effc.passes import Pass, PassResult

LINEAR = torch._C._nn.linear


def linear_sites(gm: fx.GraphModule, ctx):
    """(node, weight name) for every linear call whose weight is a lifted parameter."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is LINEAR:
            name = ctx.facts.weight_name(node.args[1])
            if name is not None:
                yield node, name


class CopyWeightPass(Pass):
    """Replaces each linear's weight by a constant copy derived at compile time.

    Numerically a no-op, so outputs stay bit-identical, but it exercises everything a real
    weight pass does: filters, claims, derived constants and the stale-weight guard.
    """

    name = "toy_copy"
    rewrites_weights = True

    def run(self, gm, ctx):
        rows = []
        for node, wname in linear_sites(gm, ctx):
            if not ctx.selected(wname):
                rows.append(SiteRow(self.name, wname, "skipped", "excluded by filters"))
                continue
            denied = ctx.claim(wname, [wname])
            if denied:
                rows.append(SiteRow(self.name, wname, "skipped", denied))
                continue
            value = ctx.facts.weights[wname].value
            const = ctx.add_constant(gm, value.detach().clone(), derived_from=[wname],
                                     name_hint=wname)
            node.update_arg(1, const)
            n = value.numel()
            rows.append(SiteRow(self.name, wname, "rewritten", params_before=n, params_after=n))
        return PassResult(rows)


class SecondWeightPass(Pass):
    """A second weight pass that claims every weight matrix it is allowed to, without editing
    the graph: checks that one weight is never taken by two passes."""

    name = "toy_second"
    rewrites_weights = True

    def run(self, gm, ctx):
        rows = []
        for wname, gi in ctx.facts.weights.items():
            if gi.value.dim() != 2 or not ctx.selected(wname):
                continue
            denied = ctx.claim(wname, [wname])
            rows.append(SiteRow(self.name, wname, "skipped" if denied else "rewritten", denied or ""))
        return PassResult(rows)


class RaisingPass(Pass):
    """Damages the graph, then raises: the manager must roll the damage back."""

    name = "toy_raise"

    def run(self, gm, ctx):
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target is LINEAR:
                with gm.graph.inserting_after(node):
                    bad = gm.graph.call_function(torch.neg, (node,))
                node.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        gm.recompile()
        raise RuntimeError("toy failure after editing the graph")


class MLP(nn.Module):
    def __init__(self, d_in=16, d_hidden=32, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


class BrokenMLP(MLP):
    """The same MLP with a graph break between its layers: Dynamo hands effc two graphs."""

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.head(torch.relu(self.fc2(h)))


class SmallCNN(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class AttentionBlock(nn.Module):
    """x + o(attention(ln(x))), the shape of a ViT/BERT attention block, no mask; subclasses
    change the attention (masks, causal) through `attend`."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def project(self, x):
        b, t, d = x.shape
        y = self.ln(x)
        return (p(y).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                for p in (self.q, self.k, self.v))

    def forward(self, x):
        b, t, d = x.shape
        a = torch.nn.functional.scaled_dot_product_attention(*self.project(x))
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


def hf_model(kind: str, seed: int = 0) -> tuple[nn.Module, dict]:
    """A small-config Hugging Face model built from config (random weights) and an input batch."""
    import transformers as tf

    torch.manual_seed(seed)
    ids = torch.randint(0, 96, (2, 9))
    common = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, **common)
        return tf.BertModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        return tf.GPT2LMHeadModel(cfg), {"input_ids": ids}
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return tf.LlamaForCausalLM(cfg), {"input_ids": ids}
    if kind == "vit":
        cfg = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **common)
        return tf.ViTModel(cfg), {"pixel_values": torch.randn(2, 3, 16, 16)}
    if kind == "t5":  # encoder-decoder; relative position buckets are int64 in-place adds
        cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          dropout_rate=0.0)
        return tf.T5ForConditionalGeneration(cfg), {"input_ids": ids,
                                                    "decoder_input_ids": ids[:, :5]}
    if kind == "whisper":  # conv front end, transposed to [B, T, C] before the LayerNorm
        cfg = tf.WhisperConfig(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                               max_source_positions=8, max_target_positions=16, pad_token_id=0,
                               decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
        return tf.WhisperModel(cfg), {"input_features": torch.randn(2, 16, 16),
                                      "decoder_input_ids": ids[:, :5]}
    if kind == "mixtral":  # top-k routing: in-place renormalisation and index writes
        cfg = tf.MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               num_local_experts=4, num_experts_per_tok=2,
                               max_position_embeddings=64)
        return tf.MixtralForCausalLM(cfg), {"input_ids": ids}
    if kind == "falcon":  # FalconLinear computes `x @ W.T`, not F.linear
        cfg = tf.FalconConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4)
        return tf.FalconForCausalLM(cfg), {"input_ids": ids}
    raise ValueError(kind)


def first_tensor(out):
    """The main output of a model call: a tensor, a tuple's first item, or an HF output's first."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out[0] if not hasattr(out, "logits") else out.logits


def run_in_batches(model, x, options, batch: int = 16):
    """(outputs, report) of `model` compiled by effc with `options`, run on `x` in batches
    of `batch` (one graph for all of them), from a fresh Dynamo and effc state."""
    import effc

    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options=options)
    with torch.no_grad():
        out = torch.cat([compiled(b) for b in x.split(batch)])
    return out, effc.report()


def cuda_check(script: str, tmp_path) -> object:
    """Run `script` where Triton compiles for a GPU (no interpreter; no GPU needed to reach a
    cubin) and return the JSON of its last stdout line; skip where Triton's CUDA backend or
    ptxas is missing."""
    import json
    import os
    import subprocess
    import sys

    import pytest

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    if "ptxas" in done.stderr and done.returncode:
        pytest.skip("no ptxas to compile for CUDA here")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def mobilenet_crops(calibration: int, test: int, size: int):
    """(torchvision's pretrained MobileNetV2, `calibration` crops from the left halves of the
    photos scikit-image and scikit-learn ship, `test` crops from the right halves): the two
    sets never share a pixel."""
    from benchmarks.models import mobilenet_v2

    images = mobilenet_v2.photos()
    left = [img[:, :, : img.shape[2] // 2] for img in images]
    right = [img[:, :, img.shape[2] // 2:] for img in images]
    return (mobilenet_v2.pretrained(), mobilenet_v2.crops(left, calibration, size, seed=0),
            mobilenet_v2.crops(right, test, size, seed=1))



def rarely_seen_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration rows, test rows) of 64 correlated features where the 64 calibration rows
    hardly ever activate the last 16 (scaled by 0.01): what shrinkage guards against."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -1, 64)
    test_x = torch.randn(4096, 64, generator=g) @ mix.T
    calib_x = torch.randn(64, 64, generator=g) @ mix.T  # 64 rows for 64 features: auto 0.3
    calib_x[:, 48:] *= 0.01
    return calib_x, test_x
