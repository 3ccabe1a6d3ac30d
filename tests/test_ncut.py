"""The batched torch Ncut against scipy's generalised `eigh`, and the Ncut value on hand-made graphs."""
import numpy as np
import pytest
import scipy.linalg
import torch

from distill.ncut import binary_affinity, cut_score, ncut_value, second_smallest_eigenvectors


def scipy_second(w: np.ndarray) -> tuple[float, np.ndarray]:
    """The official TokenCut/MaskCut solve: eigh(D - W, D, subset_by_index=[1, 2]), first vector, with
    the sign LAPACK gives it."""
    d = np.diag(w.sum(1))
    values, vectors = scipy.linalg.eigh(d - w, d, subset_by_index=[1, 2])
    return values[0], vectors[:, 0]


def clustered_graphs(batch: int, n: int, seed: int) -> torch.Tensor:
    """Patch features around 4 random centres, binarised like TokenCut's graph (tau 0.2)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 32, generator=gen)
    labels = torch.randint(0, 4, (batch, n), generator=gen)
    features = centres[labels] + 0.8 * torch.randn(batch, n, 32, generator=gen)
    return binary_affinity(features, 0.2)


def assert_equal_to_scipy(graphs: torch.Tensor) -> None:
    values, vectors = second_smallest_eigenvectors(graphs)
    for b in range(len(graphs)):
        expected_value, expected_vector = scipy_second(graphs[b].numpy())
        assert values[b].item() == pytest.approx(expected_value, abs=1e-9)
        np.testing.assert_allclose(vectors[b].numpy(), expected_vector, atol=1e-7)


@pytest.mark.parametrize("n", [3, 60, 300])
def test_batched_torch_ncut_equals_scipy_generalised_eigh_sign_included(n):
    assert_equal_to_scipy(clustered_graphs(3, n, seed=n))


def test_graphs_with_repeated_rows_are_still_exact():
    """Identical features make the Krylov space small (the tridiagonal matrix splits)."""
    gen = torch.Generator().manual_seed(3)
    centres = torch.randn(3, 16, generator=gen)
    assert_equal_to_scipy(binary_affinity(centres[torch.randint(0, 3, (2, 300), generator=gen)], 0.2))


def test_stopping_early_equals_the_whole_reduction():
    graphs = clustered_graphs(2, 200, seed=7)
    early = second_smallest_eigenvectors(graphs)
    whole = second_smallest_eigenvectors(graphs, max_steps=200, tol=0.0)
    np.testing.assert_allclose(early[1].numpy(), whole[1].numpy(), atol=1e-9)


def test_binary_affinity_thresholds_cosine_and_keeps_zero_features_weak():
    features = torch.tensor([[[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.0, 0.0]]])
    w = binary_affinity(features, 0.2, eps=1e-5)[0]
    e = 1e-5
    expected = [[1, 1, e, e], [1, 1, e, e], [e, e, 1, e], [e, e, e, e]]  # a zero feature: cos 0 everywhere
    np.testing.assert_array_equal(w.numpy(), np.array(expected))
    assert w.dtype == torch.float64


def test_binary_affinity_joins_only_a_cosine_strictly_above_tau():
    """TokenCut's Eq. 2: E_ij = 1 if cos > tau; orthogonal patches (cos exactly 0) at tau = 0 get eps."""
    features = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [2.0, 0.5]]])
    w = binary_affinity(features, 0.0, eps=1e-5)[0]
    e = 1e-5
    np.testing.assert_array_equal(w.numpy(), np.array([[1, e, 1], [e, 1, 1], [1, 1, 1]]))


def test_ncut_value_of_two_triangles_joined_by_one_edge():
    w = torch.zeros(1, 6, 6, dtype=torch.float64)
    for a, b in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)]:
        w[0, a, b] = w[0, b, a] = 1.0
    triangle = torch.tensor([[True, True, True, False, False, False]])
    # cut = 1, vol = 2 + 2 + 3 = 7 on each side: Ncut = 2/7
    assert ncut_value(w, triangle).item() == pytest.approx(2 / 7)
    assert cut_score(w, triangle).item() == pytest.approx(1 - 1 / 7)
    everything = torch.ones(1, 6, dtype=torch.bool)
    assert ncut_value(w, everything).item() == 2.0 and cut_score(w, ~everything).item() == 0.0
