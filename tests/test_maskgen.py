"""The mask generator on hand-made queries/keys with a known answer, and against the literal formulation."""
import numpy as np
import pytest
import torch

from distill.maskgen import mass_threshold, propose_masks
from distill.reference import literal_mask


def test_mass_threshold_keeps_top_half_of_mass():
    values = torch.tensor([[4.0, 1.0, 3.0, 2.0]])
    # ascending 1,2,3,4 / 10 -> cumulative .1 .3 .6 1.0; entries with cumulative <= .5 are zeroed
    assert mass_threshold(values).tolist() == [[4.0, 0.0, 3.0, 0.0]]



def test_mass_threshold_zeroes_an_entry_whose_cumulative_mass_is_exactly_one_minus_mass():
    # ascending 1, 1, 2 / 4 -> cumulative .25 .5 1.0: the second 1 reaches .5 exactly and is zeroed (> .5 kept)
    assert mass_threshold(torch.tensor([[2.0, 1.0, 1.0]])).tolist() == [[2.0, 0.0, 0.0]]


def _handmade_qk(grid_h=5, grid_w=6, num_heads=6, dim=4):
    """Object A (2x2, strong CLS response) and object B (disconnected, weaker), on a background
    whose keys point away from A. The last head's CLS query points away from A, so it must be
    ignored by the default average over the first 5 heads."""
    e1, e3 = torch.eye(dim)[0], torch.eye(dim)[2]
    n = grid_h * grid_w
    key = (-0.5 * e1 + 0.6 * e3).repeat(num_heads, 1 + n, 1)  # background: G_cls = 0.1, k.k_A < 0
    a_patches = [(1, 1), (1, 2), (2, 1), (2, 2)]
    b_patches = [(3, 5), (4, 5)]
    for r, c in a_patches:
        key[:, 1 + r * grid_w + c] = 2 * e1
    for r, c in b_patches:
        key[:, 1 + r * grid_w + c] = e1
    query = torch.zeros(num_heads, 1 + n, dim)
    query[:, 0] = e1 + e3
    query[num_heads - 1, 0] = -100 * e1
    expected = np.zeros((grid_h, grid_w), dtype=bool)
    for r, c in a_patches:
        expected[r, c] = True
    return query[None], key[None], expected


def test_handmade_case_gives_the_seed_component():
    query, key, expected = _handmade_qk()
    (result,) = propose_masks(query, key, 5, 6)
    assert result.seed_patch == (1, 1)  # highest G_cls, first by index among ties
    np.testing.assert_array_equal(result.mask, expected)  # B is foreground but not connected
    assert not result.seed_in_background
    assert result.score == pytest.approx(1.0)  # all thresholded CLS mass lies in A



def test_sources_are_the_top_candidates_similar_to_the_seed_and_the_object_scores_above_zero():
    """One head, a 3x4 grid, keys A = e1 (seed), D = e2 (next to A, orthogonal to it), B = e1/2 + e3, C = e3
    and the background -e1 - e3 + 13 e4; G_cls ranks A (10) > D (9) > B (7) > C (2) > background (1), and
    mass 1 keeps every score. topk 0.25 makes A, D, B the 3 candidates; the sources are A and B (G_i > 0 with
    A; not D, G_i = 0), so C joins through B (score 1), and D, of score exactly 0, stays out."""
    e = torch.eye(4)
    keys = {(0, 0): e[0], (0, 1): e[1], (1, 0): 0.5 * e[0] + e[2], (2, 0): e[2]}
    key = (-e[0] - e[2] + 13 * e[3]).repeat(1, 1, 13, 1)
    for (r, c), k in keys.items():
        key[0, 0, 1 + r * 4 + c] = k
    query = torch.zeros(1, 1, 13, 4)
    query[0, 0, 0] = torch.tensor([10.0, 9.0, 2.0, 1.0])
    (result,) = propose_masks(query, key, 3, 4, topk=0.25, mass=1.0)
    assert result.seed_patch == (0, 0)
    expected = np.zeros((3, 4), dtype=bool)
    expected[[0, 1, 2], 0] = True
    np.testing.assert_array_equal(result.mask, expected)


def test_handmade_case_uses_only_the_first_heads():
    query, key, _ = _handmade_qk()
    (with_all_heads,) = propose_masks(query, key, 5, 6, heads=6)
    assert with_all_heads.seed_patch != (1, 1)


def test_literal_reference_agrees_on_handmade_case():
    query, key, expected = _handmade_qk()
    np.testing.assert_array_equal(literal_mask(query[0].numpy(), key[0].numpy(), 5, 6), expected)


@pytest.mark.parametrize("seed", range(6))
def test_batched_generator_equals_literal_formulation(seed):
    """The O(N·D) implementation equals the paper's explicit N x N formulation, image by image."""
    gen = torch.Generator().manual_seed(seed)
    grid_h, grid_w, heads, dim = 7, 9, 6, 8
    query = torch.randn(3, heads, 1 + grid_h * grid_w, dim, generator=gen)
    key = torch.randn(3, heads, 1 + grid_h * grid_w, dim, generator=gen) + 0.3
    for b, result in enumerate(propose_masks(query, key, grid_h, grid_w)):
        expected = literal_mask(query[b].numpy(), key[b].numpy(), grid_h, grid_w)
        np.testing.assert_array_equal(result.mask, expected)
        assert result.mask[result.seed_patch]


def test_token_count_must_match_grid():
    with pytest.raises(ValueError):
        propose_masks(torch.zeros(1, 6, 10, 4), torch.zeros(1, 6, 10, 4), 3, 4)
