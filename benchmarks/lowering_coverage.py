"""How much of real models the Triton lowering takes: one row per Hugging Face architecture.

    .venv/bin/python benchmarks/lowering_coverage.py            # prints the table (~1 min, CPU)
    .venv/bin/python benchmarks/lowering_coverage.py --record   # and writes it to BENCHMARKS.md
    .venv/bin/python benchmarks/lowering_coverage.py --dtype bfloat16 --record   # other dtypes
    .venv/bin/python benchmarks/lowering_coverage.py --dynamic --record  # dynamic=True, 2 lengths

Each architecture is built from a small config (random weights, nothing downloaded), compiled
with `lowering="triton"` (kernels under the Triton interpreter on a CPU) with passes off and
with low_rank, and compared with the same graph run eagerly. Per row: graphs, generated
kernels, FX nodes they compute, calls left eager by kind (library GEMMs/attention, views,
non-float ops, float ops without a kernel) and the writes kept eager, and the relative error.
No timings: this measures coverage and correctness, not speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import effc  # noqa: E402
from benchmarks.common import machine, main_output, record, table  # noqa: E402


def models() -> dict:
    """name -> (model, inputs): small configs of each architecture."""
    import transformers as tf

    torch.manual_seed(0)
    ids = torch.randint(3, 96, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    size = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4)
    decoder = dict(num_key_value_heads=2, max_position_embeddings=64, **size)
    made = {
        "llama": (tf.LlamaForCausalLM(tf.LlamaConfig(**decoder)), {"input_ids": ids}),
        "mistral": (tf.MistralForCausalLM(tf.MistralConfig(**decoder)),
                    {"input_ids": ids, "attention_mask": mask}),
        "qwen2": (tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder)), {"input_ids": ids}),
        "gemma": (tf.GemmaForCausalLM(tf.GemmaConfig(head_dim=8, **decoder)), {"input_ids": ids}),
        "mixtral": (tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=4,
                                                           num_experts_per_tok=2, **decoder)),
                    {"input_ids": ids}),
        "phi": (tf.PhiForCausalLM(tf.PhiConfig(max_position_embeddings=64, **size)),
                {"input_ids": ids}),
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4,
                                                  n_positions=64)),
                 {"input_ids": ids, "attention_mask": mask}),
        "gpt_neox": (tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(max_position_embeddings=64, **size)),
                     {"input_ids": ids}),
        "falcon": (tf.FalconForCausalLM(tf.FalconConfig(vocab_size=96, hidden_size=32,
                                                        num_hidden_layers=2,
                                                        num_attention_heads=4)),
                   {"input_ids": ids}),
        "opt": (tf.OPTForCausalLM(tf.OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               word_embed_proj_dim=32,
                                               max_position_embeddings=64)),
                {"input_ids": ids}),
        "bert": (tf.BertModel(tf.BertConfig(max_position_embeddings=64, **size)),
                 {"input_ids": ids, "attention_mask": mask}),
        "roberta": (tf.RobertaModel(tf.RobertaConfig(max_position_embeddings=64, **size)),
                    {"input_ids": ids, "attention_mask": mask}),
        "distilbert": (tf.DistilBertModel(tf.DistilBertConfig(vocab_size=96, dim=32, n_layers=2,
                                                              n_heads=4, hidden_dim=64)),
                       {"input_ids": ids, "attention_mask": mask}),
        "t5": (tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=96, d_model=32, d_kv=8,
                                                         d_ff=64, num_layers=2, num_heads=4)),
               {"input_ids": ids, "decoder_input_ids": ids[:, :5]}),
        "whisper": (tf.WhisperModel(tf.WhisperConfig(
            vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=8, max_target_positions=16,
            pad_token_id=0, decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)),
            {"input_features": torch.randn(2, 16, 16), "decoder_input_ids": ids[:, :5]}),
        "vit": (tf.ViTModel(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64)),
                {"pixel_values": torch.randn(2, 3, 16, 16)}),
        "swin": (tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                            depths=[1, 1], num_heads=[2, 2], window_size=4)),
                 {"pixel_values": torch.randn(2, 3, 32, 32)}),
        "convnext": (tf.ConvNextModel(tf.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16],
                                                        depths=[1, 1], image_size=32)),
                     {"pixel_values": torch.randn(2, 3, 32, 32)}),
    }
    return {name: (model.eval(), inputs) for name, (model, inputs) in made.items()}


def _shorter(inputs: dict) -> dict:
    """The same batch 4 tokens shorter (text models; images keep their size)."""
    return {k: v[:, :-4] if k in ("input_ids", "attention_mask") else v for k, v in inputs.items()}


def run(model, inputs, options: dict, dynamic: bool = False) -> tuple[list, list]:
    """Outputs (two lengths under `dynamic`) and the report's graphs."""
    torch._dynamo.reset()
    effc.reset()
    compiled = torch.compile(model, backend="effc", options=options,
                             **({"dynamic": True} if dynamic else {}))
    outs = []
    with torch.inference_mode():
        for batch in ([inputs, _shorter(inputs)] if dynamic else [inputs]):
            outs.append(main_output(compiled(**batch)).float())
    return outs, effc.report().graphs


def row(name: str, model, inputs, passes: dict, dynamic: bool = False) -> list:
    refs, _ = run(model, inputs, {**passes, "lowering": "eager"}, dynamic)
    outs, graphs = run(model, inputs, {**passes, "lowering": "triton"}, dynamic)
    rel = max(((out - ref).norm() / ref.norm()).item() for out, ref in zip(outs, refs))
    eager: dict[str, int] = {}
    for g in graphs:
        for kind, ops in g.eager_ops.items():
            eager[kind] = eager.get(kind, 0) + sum(ops.values())
    writes = sum(len(f.nodes) for g in graphs for f in g.fallbacks
                 if "writes in place" in f.reason)
    other = [f for g in graphs for f in g.fallbacks if "writes in place" not in f.reason]
    return [name, "low_rank" if passes else "off", len(graphs), sum(len(g.kernels) for g in graphs),
            sum(len(k.nodes) for g in graphs for k in g.kernels), eager.get("library", 0),
            eager.get("views", 0), eager.get("non-float", 0), eager.get("other", 0), writes,
            len(other), f"{rel:.1e}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="write the table to BENCHMARKS.md")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--dynamic", action="store_true",
                        help="compile with dynamic=True and run two lengths (the error is the "
                             "larger of the two)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, (model, inputs) in models().items():
        model = model.to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        for passes in ({}, {"low_rank": {"rank": 8}}):
            rows.append(row(name, model, inputs, passes, args.dynamic))
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    headers = ["model", "passes", "graphs", "kernels", "FX nodes in kernels", "eager: library",
               "eager: views", "eager: non-float", "eager: float, no kernel",
               "in-place writes kept eager", "other fallbacks", "rel err vs same graph eager"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        "CPU, Triton interpreter"
    how = f"{args.dtype}, batch 2 x 9 tokens" + (
        ", dynamic=True, then 5 tokens (same graph)" if args.dynamic else "")
    text = f"lowering coverage; {device}; {machine()}; {how}\n\n" + table(headers, rows)
    print("\n" + text)
    if args.record:
        key = "lowering_coverage" + ("" if args.dtype == "float32" else f"_{args.dtype}") + (
            "_dynamic" if args.dynamic else "")
        flags = " ".join(f for f in (f"--dtype {args.dtype}" if args.dtype != "float32" else "",
                                     "--dynamic" if args.dynamic else "") if f)
        record(key, "## Triton lowering: coverage of Hugging Face architectures "
               f"(lowering_coverage.py{' ' + flags if flags else ''})\n\n" + text)


if __name__ == "__main__":
    main()
