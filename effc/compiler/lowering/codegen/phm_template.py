"""The PHM template: `effc.phm_linear` with the generated epilogue in its slot.

y = x @ W.T (+ bias) with W = sum_t a_t kron s_t (a: [T, n, n], s: [T, p, q]), W never built.
The kernel text is TEMPLATE in effc/kernels/phm.py, which the op's own kernel fills with its
fixed epilogue (bias, activation, store), so the op and the lowering run one algorithm: grid
(cdiv(M, BLOCK_M), n * cdiv(p, BLOCK_P)); the program for row block r and column block
(i, c) owns the output columns i * p + c * BLOCK_P + [0, BLOCK_P) of block-row i, and for each
term t and K chunk mixes x's n blocks of q features with a_t[i, :] in registers (fp32, rounded
to the input dtype) and adds that [BLOCK_M, BLOCK_K] tile times s_t's [BLOCK_K, BLOCK_P] tile
(`tl.dot`, fp32 accumulation). Masked lanes read zeros, so ragged M, p and q add nothing. The
epilogue then sees `acc` [BLOCK_M, BLOCK_P] with offs_n/mask_n the program's output columns
and N = n p, exactly what the other templates give it (templates.py writes it).

Tiling: `triton.autotune` over PHM_CONFIGS on CUDA, keyed on the row bucket and n, p, q, T;
one fixed config under the interpreter (INTERPRETER_CONFIG: 16-wide p and K blocks, so small
test shapes already span several ragged blocks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from effc.compiler.lowering.codegen.launch import cdiv
from effc.kernels.phm import kernel_source

BLOCKS = ("BLOCK_M", "BLOCK_P", "BLOCK_K")
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_P": 16, "BLOCK_K": 16}
# (BLOCK_M, BLOCK_P, BLOCK_K, num_warps, num_stages). p and q are out/n and in/n, often small
# (a 4096-wide layer at n = 4: 1024; the fitted layers of a small model: 8 to 64), so narrow
# P tiles are among them; 16-row tiles for decode. Each K chunk costs n loads of x, one of s.
PHM_CONFIGS = [
    (128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 8, 3), (64, 32, 64, 4, 3),
    (32, 64, 64, 4, 3), (16, 64, 64, 4, 3), (16, 32, 128, 4, 3),
]
AUTOTUNE_KEY = ["M_BUCKET", "NB", "P", "Q", "T"]

# xt, the mix of x's blocks (fp32), rounded to the input dtype before the dot: nearest-even,
# also for bf16 under the interpreter (whose fp32 -> bf16 cast truncates)
_ROUND_XT = {torch.float32: "xt", torch.float16: "xt.to(tl.float16)",
             torch.bfloat16: "round_to_bf16(xt).to(tl.bfloat16)"}


def source(name: str, operand_params: Sequence[str], scalar_params: Sequence[str],
           epilogue: Sequence[str], dtype: torch.dtype) -> str:
    """The kernel text: phm's TEMPLATE with the generated epilogue (needs round_to_bf16 in the
    module for bf16, which module_text adds for a bf16 group)."""
    return kernel_source(name, operand_params, scalar_params, _ROUND_XT[dtype], epilogue)


def what(node_name: str, x: str, a_shape: tuple, s_shape: tuple) -> str:
    """The summary's first words for one phm group."""
    t, n, _ = a_shape
    _, p, q = s_shape
    return (f"phm_linear ({node_name}: x={x}, {t} terms a_t [{n}, {n}] kron s_t [{p}, {q}]; "
            "W is never built: x's blocks are mixed with a_t in registers before each dot)")


def out_features(a: torch.Tensor, s: torch.Tensor) -> int:
    return a.shape[1] * s.shape[1]


def sizes(m: int, a: torch.Tensor, s: torch.Tensor) -> list[int]:
    """The template's size arguments M, NB, P, Q, T."""
    return [m, a.shape[1], s.shape[1], s.shape[2], a.shape[0]]


def grid(m: int, a: torch.Tensor, s: torch.Tensor, meta: dict) -> tuple[int, int]:
    """(row blocks, n block-rows x column blocks of p)."""
    return cdiv(m, meta["BLOCK_M"]), a.shape[1] * cdiv(s.shape[1], meta["BLOCK_P"])
