"""Quickstart: compile a small Hugging Face Llama with effc and print what it did.

    bash scripts/demo.sh            # or: .venv/bin/python examples/quickstart.py

The model is built from a config (random weights, nothing downloaded). With no pass enabled
effc returns exactly eager's numbers; each pass is switched on by its own option.
"""

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import effc


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 16))

    debug_dir = tempfile.mkdtemp(prefix="effc_debug_")
    options = {"verify": True, "debug_dir": debug_dir}
    compiled = torch.compile(model, backend="effc", options=options)

    with torch.inference_mode():
        eager_logits = model(input_ids=input_ids).logits
        effc_logits = compiled(input_ids=input_ids).logits

    print(effc.report())
    same = torch.equal(eager_logits, effc_logits)
    print(f"logits equal to eager bit for bit: {same}")
    print(f"debug dump (graph code after each pass, report.md, report.json): {debug_dir}")
    print("what would each pass do? effc.explain(model, input_ids, **options) returns the report.")


if __name__ == "__main__":
    main()
