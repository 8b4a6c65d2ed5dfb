"""Quickstart: compile a small Hugging Face Llama with effc and see what it did.

    bash scripts/demo.sh            # or: .venv/bin/python examples/quickstart.py

The model is built from a config (random weights, nothing downloaded). With no pass enabled
effc returns exactly eager's numbers; `low_rank` factorizes the MLP weights, whitened by
activation statistics from `effc.calibrate`, and the report shows every site's rank, size
and measured error.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import effc


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 16))

    # 1. passes off: the same numbers as eager, bit for bit
    plain = torch.compile(model, backend="effc")
    with torch.inference_mode():
        eager_logits = model(input_ids=input_ids).logits
        same = torch.equal(plain(input_ids=input_ids).logits, eager_logits)
    print(f"passes off: logits equal to eager bit for bit: {same}\n")

    # 2. low_rank on the MLPs, activation-aware (calibrated on sample batches)
    calib = effc.calibrate(model, [torch.randint(0, 256, (4, 32)) for _ in range(4)],
                           progress=False)
    debug_dir = tempfile.mkdtemp(prefix="effc_debug_")
    options = {"low_rank": {"rank_ratio": 0.25, "include": ["*.mlp.*"]},
               "calibration": calib, "verify": True, "debug_dir": debug_dir}
    effc.reset()
    compiled = torch.compile(model, backend="effc", options=options)
    with torch.inference_mode():
        logits = compiled(input_ids=input_ids).logits
    print(effc.report())
    agree = (logits.argmax(-1) == eager_logits.argmax(-1)).float().mean().item()
    print(f"next-token agreement with eager: {agree:.1%}")
    print(f"debug dump (graph code after each pass, diffs, report.md/json): {debug_dir}")
    print("effc.explain(model, input_ids, **options) returns the same report without lowering.")


if __name__ == "__main__":
    main()
