"""effc::binary_attention's Triton kernel against the torch reference, under the interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 without CUDA), on ragged shapes with NaN-poisoned
output buffers, so an element the kernel fails to write cannot pass; and its popcount."""

import pytest
import torch
from lowering_helpers import DEVICE

pytest.importorskip("triton")

from effc.kernels.binary_attention import binary_attention_reference  # noqa: E402
from effc.kernels.binary_attention_triton import (  # noqa: E402
    binary_attention_triton, pack_codes, popcount_int32)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}


def _inputs(heads, kv_heads, lq, lk, d, dv, bits, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, lq, d, generator=g)
    k = torch.randn(2, kv_heads, lk, d, generator=g)
    v = torch.randn(2, kv_heads, lk, dv, generator=g)
    proj = torch.randn(d, bits, generator=g)
    return [t.to(dtype=dtype, device=DEVICE) for t in (q, k, v, proj)]


def _run(q, k, v, proj, causal, **blocks):
    out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=v.dtype, device=v.device)
    got = binary_attention_triton(q, k, v, proj, causal, out=out, **blocks)
    assert got.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "the kernel left elements unwritten"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("d", [8, 16])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_kernel_matches_the_reference(length, d, bits, causal, dtype):
    seed = length * 1000 + d * 10 + bits + causal + (dtype == torch.bfloat16) * 7
    q, k, v, proj = _inputs(4, 2, length, length, d, d, bits, dtype, seed)
    out = _run(q, k, v, proj, causal)
    ref = binary_attention_reference(q, k, v, proj, causal)
    assert out.dtype == v.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(33, 33), (33, 20), (9, 40)])
def test_several_blocks_and_unequal_lengths(lq, lk, causal):
    """16-row blocks: several query and key blocks, the causal early stop, ragged tails."""
    q, k, v, proj = _inputs(4, 2, lq, lk, 16, 12, 96, torch.float32, lq + lk + causal)
    out = _run(q, k, v, proj, causal, block_m=16, block_n=16)
    torch.testing.assert_close(out, binary_attention_reference(q, k, v, proj, causal),
                               **TOL[torch.float32])


def test_strided_inputs_and_output():
    q, k, v, proj = _inputs(2, 2, 7, 7, 16, 8, 32, torch.float32, 3)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    out_t = torch.full((2, 7, 2, 8), float("nan"), device=DEVICE).transpose(1, 2)
    binary_attention_triton(q, k, v, proj, True, out=out_t)
    torch.testing.assert_close(out_t, binary_attention_reference(q, k, v, proj, True),
                               **TOL[torch.float32])


def test_code_widths_not_a_multiple_of_32_use_the_reference():
    q, k, v, proj = _inputs(2, 1, 5, 5, 8, 8, 48, torch.float32, 4)
    out = _run(q, k, v, proj, True)
    assert torch.equal(out, binary_attention_reference(q, k, v, proj, True))
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_codes(q, proj)


def test_packed_codes_hold_the_signs():
    q, _, _, proj = _inputs(1, 1, 3, 3, 8, 8, 64, torch.float32, 5)
    words = pack_codes(q, proj)                                       # [2, 1, 3, 2]
    assert words.dtype == torch.int32 and words.shape == (2, 1, 3, 2)
    on = (q @ proj) >= 0
    unpacked = [[(int(w) >> i) & 1 for w in row for i in range(32)]
                for row in words.view(-1, 2).tolist()]
    assert unpacked == on.view(-1, 64).int().tolist()


def test_popcount_matches_python():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2**31, 2**31 - 1, (777,), generator=g, dtype=torch.int64)
    x = torch.cat([torch.tensor([0, -1, 1, -2**31, 2**31 - 1, 0x55555555, -0x55555556]), x])
    x = x.to(torch.int32)
    assert (x < 0).any()
    got = popcount_int32(x.to(DEVICE)).cpu().tolist()
    assert got == [bin(w & 0xFFFFFFFF).count("1") for w in x.tolist()]


def test_the_op_has_a_cuda_kernel_and_the_cpu_reference():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("effc::binary_attention", "CUDA")
    q, k, v, proj = _inputs(2, 1, 5, 5, 8, 8, 32, torch.float32, 6)
    q, k, v, proj = (t.cpu() for t in (q, k, v, proj))
    assert torch.equal(torch.ops.effc.binary_attention(q, k, v, proj, False),
                       binary_attention_reference(q, k, v, proj, False))
