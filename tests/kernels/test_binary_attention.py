"""effc::binary_attention: Hamming-similarity attention against an explicit bit count."""

import pytest
import torch

from effc.kernels.binary_attention import binary_attention, binary_codes


def _hamming_reference(q, k, v, proj, causal):
    """sum_j (b - popcount(code(q) xor code(k))) v_j / sum_j (...), by explicit bits."""
    bits = proj.shape[1]
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    cq, ck = (q.double() @ proj.double()) >= 0, (k.double() @ proj.double()) >= 0
    differ = (cq[..., :, None, :] != ck[..., None, :, :]).sum(-1)          # [B, H, L, S]
    sim = (bits - differ).double()
    if causal:
        sim = sim.tril()
    return (sim @ v.double()) / sim.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2)])
def test_binary_attention_is_the_hamming_similarity_average(causal, heads, kv_heads):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads + causal)
    q = torch.randn(2, heads, 7, 16, generator=g)
    k, v = torch.randn(2, kv_heads, 7, 16, generator=g), torch.randn(2, kv_heads, 7, 8, generator=g)
    proj = torch.randn(16, 32, generator=g)
    out = binary_attention(q, k, v, proj, causal)
    assert out.shape == (2, heads, 7, 8)
    assert torch.allclose(out.double(), _hamming_reference(q, k, v, proj, causal), atol=1e-5)


def test_codes_are_signs_and_bad_shapes_raise():
    x = torch.tensor([[1.0, -2.0], [0.0, 0.5]])
    assert binary_codes(x, torch.eye(2)).tolist() == [[1, -1], [1, 1]]
    with pytest.raises(ValueError, match="binary_attention expects"):
        binary_attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8),
                         torch.randn(8, 16), False)


def test_the_op_traces_under_torch_compile():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    proj = torch.randn(8, 16)
    fn = torch.compile(lambda q, k, v: torch.ops.effc.binary_attention(q, k, v, proj, True),
                       backend="aot_eager", fullgraph=True)
    assert torch.allclose(fn(q, k, v), binary_attention(q, k, v, proj, True))
