"""Generated Triton kernels: compile a small Llama with low_rank and lowering="triton", generate.

    .venv/bin/python examples/triton_lowering.py

On a CUDA GPU the kernels are compiled and autotuned; without one they run under the Triton
interpreter (slow, but the same code), which must be switched on before triton is imported.
The report lists each generated kernel and the FX nodes it computes, and the ops that still
run eagerly between kernels; the debug folder holds each kernel's source (`kernels/*.py`) and
the graph that calls them (`lowered.py`).
"""

import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import effc  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval().to(device)
    prompt = torch.randint(0, config.vocab_size, (1, 12), device=device)
    debug_dir = tempfile.mkdtemp(prefix="effc_triton_")
    options = {"low_rank": {"rank_ratio": 0.25, "include": ["*.mlp.*"]}}
    tokens = {}
    for lowering in ("eager", "triton"):
        effc.reset()
        torch._dynamo.reset()
        extra = {"debug_dir": debug_dir} if lowering == "triton" else {}
        model.forward = torch.compile(LlamaForCausalLM.forward.__get__(model), backend="effc",
                                      options={**options, "lowering": lowering, **extra})
        with torch.inference_mode():
            tokens[lowering] = model.generate(prompt, max_new_tokens=6, do_sample=False,
                                              pad_token_id=0)
    prefill = effc.report().graphs[0]
    print(f"prefill graph, lowering=triton: {len(prefill.kernels)} kernels")
    for k in prefill.kernels:
        print(f"  {k.name:32s} {k.kind:9s} {len(k.nodes):2d} FX nodes -> {', '.join(k.outputs)}")
    print("ran eagerly between them:")
    for kind, ops in prefill.eager_ops.items():
        print(f"  {kind}: " + ", ".join(f"{name} x{n}" for name, n in ops.items()))
    for note in prefill.notes:
        print(f"note: {note}")
    same = torch.equal(tokens["eager"], tokens["triton"])
    print(f"\ngreedy tokens with the kernels equal those of the same graph run eagerly: {same}")
    print(f"kernel sources and the lowered graph: {debug_dir}/{prefill.graph}/")


if __name__ == "__main__":
    main()
