"""The shift template: `effc.shift_linear` with the generated epilogue in its slot.

y = x @ W.T (+ bias) with W [m, n] stored as T packed 4-bit power-of-two codes per element
(codes uint8 [T, m, ceil(n / 2)], the low nibble the even column) and scales [m, G] (one per
row, or per `group` input columns): w[o, i] = scale[o, i // group] * sum_t +-2^-e_t. The kernel
text is effc/kernels/shift.py's (`kernel_source`), which the op's own kernels fill with their
fixed epilogue (bias, activation, store), so the op and the lowering run one algorithm. The
module holds both of the op's variants with the same epilogue, and the launcher picks one per
call by the row count, as the op does:
- `<name>` ("shift", M <= SHIFT_MAX_ROWS = 16 rows): grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N));
  per scale group and K chunk, each x element times each code is formed without a multiply
  (the code's exponent subtracted from x's exponent field, its sign XOR-ed in; subnormal
  results rounded as IEEE does), summed over t and K in a [BLOCK_M, BLOCK_N, BLOCK_K] tile in
  fp32, and each group's sum times its scale once;
- `<name>_dot` (more rows): same grid; each [BLOCK_K, BLOCK_N] tile of W.T is decoded in
  registers (sum_t q from the code bits, times each element's group scale, fp32), rounded to
  x's dtype as the reference rounds its decoded weight (nearest-even; bf16 with integer ops,
  since the interpreter's cast truncates) and multiplied with `tl.dot`, fp32 accumulation.
Masked lanes read x = 0 and the zero code, so ragged M, N, K and groups add nothing. The
epilogue then sees `acc` [BLOCK_M, BLOCK_N] with offs_n/mask_n the program's output columns,
exactly what the other templates give it (templates.py writes it). The code helpers the
kernels call (`_nibbles`, `_code_value`, `_shift_mul`) are copied into the module from
shift.py, so its source (and hash) changes with them.

Tiling: `triton.autotune` on CUDA, per kernel, over SHIFT_CONFIGS (product tiles of at most
4096 lanes) or DOT_CONFIGS, keyed on the row bucket and N, K, T and the group size; one fixed
config per kernel under the interpreter (INTERPRETER_CONFIGS: small blocks, so test shapes
span several ragged blocks and several K chunks per group).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Sequence

import torch

from effc.compiler.lowering.codegen.launch import cdiv
from effc.kernels import shift
from effc.kernels.shift import SHIFT_MAX_ROWS, kernel_source

BLOCKS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
DOT_SUFFIX = "_dot"  # the module's second kernel, for more than SHIFT_MAX_ROWS rows
INTERPRETER_CONFIGS = {"shift": {"BLOCK_M": 8, "BLOCK_N": 16, "BLOCK_K": 8},
                       "dot": {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). shift: decode sizes (1..16 rows), a
# weight-bandwidth-bound GEMV whose [BLOCK_M, BLOCK_N, BLOCK_K] product tile stays <= 4096
# lanes; dot: 32+ rows, blocks >= 16 (tl.dot), the decoded W tile held in registers.
SHIFT_CONFIGS = [
    (1, 32, 64, 4, 2), (1, 64, 64, 4, 2), (2, 32, 64, 4, 2), (4, 32, 32, 4, 2),
    (8, 32, 16, 4, 2), (16, 16, 16, 4, 2), (16, 32, 8, 4, 2),
]
DOT_CONFIGS = [
    (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3),
    (32, 64, 64, 4, 3), (32, 128, 32, 4, 3),
]
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "T", "GROUP"]
HELPERS = ("_nibbles", "_code_value", "_shift_mul")

# the decoded fp32 tile w rounded to x's dtype before the dot: what the reference's decoded
# weight is, element for element (nearest-even, also for bf16 under the interpreter)
_ROUND_W = {torch.float32: "w", torch.float16: "w.to(tl.float16)",
            torch.bfloat16: "round_to_bf16(w).to(tl.bfloat16)"}


def variant(rows: int) -> str:
    """The kernel for `rows` rows, as the op picks it on CUDA."""
    return "shift" if rows <= SHIFT_MAX_ROWS else "dot"


def helpers() -> str:
    """The jit helpers both kernels call, copied from shift.py (their `@triton.jit` included)."""
    return "\n\n".join(textwrap.dedent(inspect.getsource(getattr(shift, h).fn)).strip("\n")
                       for h in HELPERS)


def source(kind: str, name: str, operand_params: Sequence[str], scalar_params: Sequence[str],
           epilogue: Sequence[str], dtype: torch.dtype) -> str:
    """The `kind` ("shift" or "dot") kernel's text with the generated epilogue (the dot one
    needs round_to_bf16 in the module for bf16, which module_text adds for a bf16 group)."""
    return kernel_source(kind, name, operand_params, scalar_params, epilogue, _ROUND_W[dtype])


def what(node_name: str, x: str, codes_shape: tuple, n, group: int, name: str) -> str:
    """The summary's first words for one shift group."""
    t, m, _ = codes_shape
    scales = f"one scale per {group} input columns" if group > 0 else "one scale per row"
    return (f"shift_linear ({node_name}: x={x}, W [{m}, {n}] as {t} packed 4-bit power-of-two "
            f"code{'s' * (t != 1)} per element, {scales}; W is never decoded in memory: {name} "
            f"adds exponents for up to {SHIFT_MAX_ROWS} rows, {name}{DOT_SUFFIX} decodes tiles "
            "in registers for tl.dot above)")


def sizes(m: int, k: int, codes: torch.Tensor, scale: torch.Tensor, group: int) -> list[int]:
    """The kernels' size arguments M, N, K, T, GROUP (K for one scale per row), N_GROUPS."""
    return [m, codes.shape[1], k, codes.shape[0], group if group > 0 else max(k, 1),
            scale.shape[1]]


def grid(m: int, n: int, meta: dict) -> tuple[int, int]:
    """(row blocks, column blocks), for both kernels."""
    return cdiv(m, meta["BLOCK_M"]), cdiv(n, meta["BLOCK_N"])
