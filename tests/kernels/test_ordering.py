"""stable_top_k: the first k of a stable descending sort, found without sorting."""

import pytest
import torch

from effc.kernels.ordering import stable_top_k


def _sorted_first(values, k):
    top = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return top.sort(dim=1).values


@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (3, 17, 5), (2, 1000, 256), (4, 64, 64),
                                      (2, 50, 0)])
def test_random_values_pick_what_the_stable_sort_picks(rows, n, k):
    values = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(stable_top_k(values, k), _sorted_first(values, k))


def test_ties_at_the_kth_value_prefer_the_lower_index():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 3, (3, 3000), generator=g).float()  # three levels, many ties
    for k in (1, 999, 1000, 1001, 2999):
        assert torch.equal(stable_top_k(values, k), _sorted_first(values, k))


def test_nan_outranks_every_number_as_in_the_sort():
    values = torch.tensor([[0.5, float("nan"), 2.0, float("inf"), 1.0]])
    assert stable_top_k(values, 2).tolist() == [[1, 3]]
    assert torch.equal(stable_top_k(values, 3), _sorted_first(values, 3))


@pytest.mark.parametrize("sort", [False, True], ids=["topk", "sort"])
def test_both_paths_pick_the_same_tokens(sort):
    """The GPU's sync-free path (a sort) and the CPU's topk path agree, ties and NaN too."""
    g = torch.Generator().manual_seed(1)
    tied = torch.randint(0, 4, (3, 500), generator=g).float()
    tied[1, 7] = float("nan")
    for values in (tied, torch.randn(2, 333, generator=g)):
        for k in (1, 37, 250, 333):
            k = min(k, values.shape[1])
            assert torch.equal(stable_top_k(values, k, sort=sort),
                               _sorted_first(values, k))
