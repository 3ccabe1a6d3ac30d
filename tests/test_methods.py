"""LOST, TokenCut and MaskCut on hand-made patch features whose answer is known; MaskCut's pixel steps;
the method registry's defaults and flag checks."""

import json

import numpy as np
import pytest
import torch

from distill.data import InputPolicy, torch_nearest_index, working_to_patch
from distill.lost import lost
from distill.maskcut import maskcut, refine_masks
from distill.methods import MethodSettings, method_features, resolve_method
from distill.patches import PatchFeatures, PatchMask
from distill.registry import load_method, method_names
from distill.tokencut import tokencut

E = torch.eye(8)


def features_from_labels(labels: np.ndarray, vectors: dict) -> torch.Tensor:
    """(1, N, D) patch features: the vector of each patch's label, raster order."""
    return torch.stack([vectors[int(v)] for v in labels.reshape(-1)])[None]


def block_mask(shape, cells) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for r, c in cells:
        mask[r, c] = True
    return mask


# ----------------------------------------------------------------------------- LOST


def lost_layout():
    """A (2 patches, degree 4), C (3, degree 5), B (3, degree 7) and background (22, degree 21) on a
    5x6 grid; A·B > 0, B·C > 0, A·C = 0 and everything below 0 with the background."""
    labels = np.zeros((5, 6), dtype=int)
    cells = {1: [(1, 1), (1, 2)], 2: [(2, 1), (2, 2), (2, 3)], 3: [(3, 1), (3, 2), (3, 3)]}
    for label, where in cells.items():
        for r, c in where:
            labels[r, c] = label
    vectors = {0: E[0] - 0.1 * E[1], 1: E[1], 2: E[1] + E[2], 3: E[2]}
    return features_from_labels(labels, vectors), cells


def test_lost_seed_is_the_lowest_degree_patch_and_k_patches_bounds_the_expansion():
    keys, cells = lost_layout()
    # Only the 2 lowest-degree patches (A) expand the seed: A and B are positive, C is not (A·C = 0).
    (narrow,) = lost(keys, (5, 6), k_patches=2)
    assert narrow.seed_patch in cells[1]
    np.testing.assert_array_equal(narrow.mask, block_mask((5, 6), cells[1] + cells[2]))
    # With every patch a candidate, B (similar to the seed) joins the sources, and B·C > 0 adds C.
    (wide,) = lost(keys, (5, 6), k_patches=100)
    np.testing.assert_array_equal(wide.mask, block_mask((5, 6), cells[1] + cells[2] + cells[3]))
    assert not wide.seed_in_background


def test_lost_score_is_one_minus_half_the_ncut_on_the_positive_graph():
    keys, cells = lost_layout()
    (result,) = lost(keys, (5, 6), k_patches=2)
    # Positive graph: A-A 1 pair, A-B 6, B-B 3, B-C 9, C-C 3, background clique. The mask (A+B) has
    # vol = A: 2*(1+3) + B: 3*(2+2+3) = 8 + 21 = 29 and cut = B-C edges = 9; the rest has vol
    # C: 3*(2+3) = 15 plus the background 22*21 = 462, so Ncut = 9/29 + 9/477.
    assert result.score == pytest.approx(1 - (9 / 29 + 9 / 477) / 2)


def lost_chain_layout():
    """A (1 patch, degree 1), C (3 patches, degree 3 each), B (1 patch, degree 4) and the background (25
    patches, degree 24) on a 5x6 grid; A·B > 0, B·C > 0, A·C = 0 and everything below 0 with the background.
    By increasing degree: A, C, C, C, B, then the background, so the seed is A and B is the 5th patch."""
    labels = np.zeros((5, 6), dtype=int)
    cells = {1: [(1, 1)], 2: [(1, 2)], 3: [(2, 1), (2, 2), (2, 3)]}
    for label, where in cells.items():
        for r, c in where:
            labels[r, c] = label
    vectors = {0: E[0] - 0.1 * E[1] - 0.1 * E[2], 1: E[1], 2: E[1] + E[2], 3: E[2]}
    return features_from_labels(labels, vectors), cells


@pytest.mark.parametrize("k_patches,objects", [(4, (1, 2)), (5, (1, 2, 3))])
def test_lost_expands_the_seed_over_exactly_the_k_lowest_degree_patches(k_patches, objects):
    """LOST's Eq. 4: the sources are those of the k lowest-degree patches with a_s*j > 0. B, similar to the
    seed A, is the 5th lowest: a source with k = 5 (its row adds C, B·C > 0), not with k = 4 (A's row alone
    reaches B but not C, A·C = 0). C, among the 4 lowest, is never a source (a_s*C = 0 is not > 0)."""
    keys, cells = lost_chain_layout()
    (result,) = lost(keys, (5, 6), k_patches=k_patches)
    assert result.seed_patch == cells[1][0]
    np.testing.assert_array_equal(result.mask, block_mask((5, 6), [cell for o in objects for cell in cells[o]]))


# ----------------------------------------------------------------------------- TokenCut


def test_tokencut_cuts_the_object_cluster_and_keeps_the_seed_component():
    """An object (2x3) similar to a second blob far away: the cut takes both, the seed's component is one."""
    labels = np.zeros((6, 7), dtype=int)
    obj = [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    blob = [(5, 6)]
    for r, c in obj + blob:
        labels[r, c] = 1
    keys = features_from_labels(labels, {0: E[0], 1: E[1]})
    (result,) = tokencut(keys, (6, 7))
    assert result.seed_patch in obj + blob
    expected = obj if result.seed_patch in obj else blob
    np.testing.assert_array_equal(result.mask, block_mask((6, 7), expected))


def attention_layout():
    """A 2x2 object (features E1) in a 5x5 background (E0); CLS attention 1 on the object, 0 elsewhere."""
    labels = np.zeros((5, 5), dtype=int)
    obj = [(1, 1), (1, 2), (2, 1), (2, 2)]
    for r, c in obj:
        labels[r, c] = 1
    keys = features_from_labels(labels, {0: E[0], 1: E[1]})
    return keys, obj, torch.from_numpy((labels == 1).reshape(1, -1).astype(np.float32))


@pytest.mark.parametrize("object_attended", [True, False])
def test_tokencut_attention_rule_takes_the_side_the_cls_token_attends_to(object_attended):
    keys, obj, attention = attention_layout()
    (result,) = tokencut(keys, (5, 5), attention=attention if object_attended else 1 - attention)
    expected = block_mask((5, 5), obj)
    np.testing.assert_array_equal(result.mask, expected if object_attended else ~expected)
    assert result.seed_patch in obj if object_attended else result.seed_patch not in obj


@pytest.mark.parametrize("values,attention,active,expected_side,expected_seed", [
    # x > mean (row 1) is attended more: kept, seeded at its largest x
    ([[0, 0, 0], [5, 4, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0], [0, 0, 0]], None,
     [[0, 0, 0], [1, 1, 0], [0, 0, 0]], (1, 0)),
    # the same cut, the rest attended more: reversed, seeded at the smallest x (the first 0)
    ([[0, 0, 0], [5, 4, 0], [0, 0, 0]], [[1, 1, 1], [0, 0, 1], [1, 1, 1]], None,
     [[1, 1, 1], [0, 0, 1], [1, 1, 1]], (0, 0)),
    # x > mean is attended more only through an inactive patch (already taken): reversed
    ([[0, 0, 0], [5, 4, 0], [0, 0, 0]], [[0.5, 0.5, 0.5], [9, 0, 0.5], [0.5, 0.5, 0.5]],
     [[1, 1, 1], [0, 1, 1], [1, 1, 1]], [[1, 1, 1], [0, 0, 1], [1, 1, 1]], (0, 0)),
])
def test_attended_side(values, attention, active, expected_side, expected_seed):
    from distill.ncut import attended_side

    flat = lambda rows: np.array(rows, dtype=float).reshape(-1)
    side, seed = attended_side(flat(values), flat(attention), (3, 3), None if active is None else flat(active) > 0)
    np.testing.assert_array_equal(side, np.array(expected_side, dtype=bool))
    assert seed == expected_seed


@pytest.mark.parametrize("vector,expected", [
    # the largest |y| (-9) lies below the mean: its side (the one patch), not the side of the largest y
    ([[-9, 0, 0], [1, 1, 1], [0, 0, 0]], [[1, 0, 0], [0, 0, 0], [0, 0, 0]]),
    # the largest |y| (9) lies above the mean: that side
    ([[9, 0, 0], [-1, -1, -1], [0, 0, 0]], [[1, 0, 0], [0, 0, 0], [0, 0, 0]]),
])
def test_tokencut_object_is_the_side_of_the_largest_absolute_entry(monkeypatch, vector, expected):
    """TokenCut's foreground: the seed is the patch of largest |y| (of either sign) and the object is its
    side of the mean, whatever sign the eigensolver gave y (the solver replaced by a fixed y)."""
    y = torch.tensor(vector, dtype=torch.float64).reshape(1, -1)
    monkeypatch.setattr("distill.tokencut.second_smallest_eigenvectors", lambda graph: (torch.zeros(1), y))
    (result,) = tokencut(torch.ones(1, 9, 4), (3, 3))
    np.testing.assert_array_equal(result.mask, np.array(expected, dtype=bool))
    assert result.seed_patch == (0, 0)


def test_tokencut_on_one_patch_keeps_the_patch():
    (result,) = tokencut(torch.ones(1, 1, 4), (1, 1))
    assert result.mask.tolist() == [[True]]


# ----------------------------------------------------------------------------- MaskCut


def test_maskcut_finds_two_objects_one_after_the_other():
    """A and B (same features) on a background: cut 1 takes A or B (their shared side); with its
    features zeroed, cut 2 takes the other."""
    labels = np.zeros((6, 6), dtype=int)
    a, b = [(1, 1), (1, 2), (2, 1), (2, 2)], [(3, 4), (4, 4), (4, 3)]
    for r, c in a + b:
        labels[r, c] = 1
    keys = features_from_labels(labels, {0: E[0], 1: E[1] + 0.05 * E[2]})
    (masks,) = maskcut(keys, (6, 6), num_objects=2)
    found = sorted(tuple(map(tuple, np.argwhere(m.mask))) for m in masks)
    assert found == sorted([tuple(sorted(a)), tuple(sorted(b))])
    assert all(0 <= m.score <= 1 for m in masks)


@pytest.mark.parametrize("values,expected_side,expected_seed", [
    # x > mean holds the largest |x| (row 1) and no corner: kept, seeded at the largest x
    ([[0, 0, 0], [5, 4, 0], [0, 0, 0]], [[0, 0, 0], [1, 1, 0], [0, 0, 0]], (1, 0)),
    # x > mean holds 3 corners: reversed, seeded at the largest -x
    ([[1, 0, 1], [-1, -5, 0], [1, 0, 0.5]], [[0, 0, 0], [1, 1, 0], [0, 0, 0]], (1, 1)),
    # x > mean (the four edge middles) misses the largest |x| (-9): reversed with no corner in it
    ([[-3, 1, -3], [1, -9, 1], [-3, 1, -3]], [[1, 0, 1], [0, 1, 0], [1, 0, 1]], (1, 1)),
])
def test_maskcut_foreground_rule_is_the_official_decision(values, expected_side, expected_seed):
    from distill.maskcut import _choose_foreground

    side, seed = _choose_foreground(np.array(values, dtype=float).reshape(-1), (3, 3))
    np.testing.assert_array_equal(side, np.array(expected_side, dtype=bool))
    assert seed == expected_seed


def cut_with_vector(vector, num_objects: int = 1):
    """MaskCut's masks when every cut's Ncut eigenvector is `vector` (the solver replaced): the rules that
    pick and drop a cut's mask, without the eigensolver."""
    x = torch.tensor(vector, dtype=torch.float64).reshape(1, -1)
    keys = torch.ones(1, x.shape[1], 4)
    (masks,) = maskcut(keys, np.shape(vector), num_objects=num_objects, solver=lambda graph: (torch.zeros(1), x))
    return masks


@pytest.mark.parametrize("vector,expected,seed", [
    # x > mean ({9, 1, 1}) holds the largest |x| and exactly 3 corners: the corner rule alone reverses it
    ([[9, 0, 1], [-1, -1, -1], [1, -1, -1]], [[0, 1, 0], [1, 1, 1], [0, 1, 1]], (1, 0)),
    # x > mean (the top row) holds the largest |x| and 2 corners: kept
    ([[9, 1, 1], [-1, -1, -1], [-1, -1, -1]], [[1, 1, 1], [0, 0, 0], [0, 0, 0]], (0, 0)),
])
def test_maskcut_corner_rule_reverses_a_side_holding_three_corners(vector, expected, seed):
    """CutLER's object-centric prior (`check_num_fg_corners`, `nc >= 3`): a side holding 3 or more of the
    grid's 4 corners is background, even when it holds the largest |x|; the seed is then the largest -x."""
    (mask,) = cut_with_vector(vector)
    np.testing.assert_array_equal(mask.mask, np.array(expected, dtype=bool))
    assert mask.seed_patch == seed


def test_maskcut_drops_a_cut_repeating_the_previous_mask_and_compares_with_the_kept_one():
    """Cut t >= 2 is dropped when its IoU with cut t - 1's mask exceeds 0.5; cut 3 is compared with cut
    2's mask as kept (empty: dropped), so the same mask comes back (CutLER's `current_mask`)."""
    vector = np.full((6, 6), -1.0)
    vector[1:4, 1:4] = 3.0
    masks = cut_with_vector(vector, num_objects=3)
    assert len(masks) == 2
    for mask in masks:
        np.testing.assert_array_equal(mask.mask, vector > 0)


def test_maskcut_masks_out_every_object_found_so_far():
    """Eq. 3 ("masking out"): before cut t + 1 the features of every object found so far, not only the last
    one, are zeroed, so their patches keep only eps links. The solver records each cut's graph and returns an
    eigenvector whose x > mean side is A, then B, then C."""
    objects = [[(1, 1), (1, 2)], [(3, 3), (3, 4)], [(4, 1), (4, 2)]]
    vectors = [np.where(block_mask((6, 6), cells), 3.0, -1.0) for cells in objects]
    graphs = []

    def solver(graph):
        graphs.append(graph[0].clone())
        return torch.zeros(1), torch.from_numpy(vectors[len(graphs) - 1]).reshape(1, -1)

    (masks,) = maskcut(torch.ones(1, 36, 4), (6, 6), num_objects=3, solver=solver)
    assert [sorted(map(tuple, np.argwhere(m.mask).tolist())) for m in masks] == objects
    for cut, graph in enumerate(graphs):
        masked = block_mask((6, 6), [cell for cells in objects[:cut] for cell in cells]).reshape(-1)
        assert (graph[masked] == 1e-5).all() and (graph[:, masked] == 1e-5).all()
        assert (graph[~masked][:, ~masked] == 1).all()


def test_maskcut_attention_rule_follows_the_cls_token():
    keys, obj, attention = attention_layout()
    (masks,) = maskcut(keys, (5, 5), num_objects=1, attention=attention)
    np.testing.assert_array_equal(masks[0].mask, block_mask((5, 5), obj))
    (masks,) = maskcut(keys, (5, 5), num_objects=1, attention=1 - attention)
    np.testing.assert_array_equal(masks[0].mask, ~block_mask((5, 5), obj))


def test_maskcut_drops_a_later_mask_of_one_percent_of_the_grid():
    labels = np.zeros((12, 12), dtype=int)
    labels[2:6, 2:6] = 1
    labels[9, 9] = 2  # 1 patch of 144: <= 1%
    keys = features_from_labels(labels, {0: E[0], 1: E[1], 2: E[2]})
    (masks,) = maskcut(keys, (12, 12), num_objects=2)
    assert len(masks) == 1
    np.testing.assert_array_equal(masks[0].mask, labels == 1)


def test_maskcut_drops_a_later_mask_of_exactly_one_percent_of_the_grid():
    """CutLER drops a later mask covering <= 1% of the grid: one patch of 100 is dropped, two are kept."""
    for extra, expected in (([(8, 8)], 1), ([(8, 8), (8, 7)], 2)):
        labels = np.zeros((10, 10), dtype=int)
        labels[2:6, 2:6] = 1
        for cell in extra:
            labels[cell] = 2
        keys = features_from_labels(labels, {0: E[0], 1: E[1], 2: E[2]})
        (masks,) = maskcut(keys, (10, 10), num_objects=2)
        assert len(masks) == expected
        np.testing.assert_array_equal(masks[0].mask, labels == 1)
        if expected == 2:
            np.testing.assert_array_equal(masks[1].mask, labels == 2)


def test_maskcut_refinement_snaps_to_edges_removes_earlier_pixels_and_drops_noise():
    """A bright square on a dark image; patch proposals that overrun it, overlap each other, or sit on
    flat background. The CRF snaps the first to the square, the second loses the first's pixels and
    what remains is background (dropped), the third is background (dropped)."""
    image = np.full((64, 64, 3), 30, np.uint8)
    image[16:40, 24:48] = 220
    geometry = InputPolicy(0, 2048, 0, 8).geometry(64, 64)
    over = block_mask((8, 8), [(r, c) for r in range(2, 6) for c in range(3, 6)])  # rows 16..47, one dark row
    overlapping = block_mask((8, 8), [(r, c) for r in range(2, 5) for c in range(3, 7)])
    flat = block_mask((8, 8), [(7, 0)])
    refined = refine_masks(image, [PatchMask(over, 0.9), PatchMask(overlapping, 0.8), PatchMask(flat, 0.7)],
                           geometry)
    square = np.zeros((64, 64), bool)
    square[16:40, 24:48] = True
    np.testing.assert_array_equal(refined[0], square)
    assert refined[1] is None and refined[2] is None


# ----------------------------------------------------------------------------- input geometry


@pytest.mark.parametrize("out_size,in_size", [(480, 34), (480, 30), (64, 32), (100, 7), (33, 33)])
def test_torch_nearest_index_matches_f_interpolate(out_size, in_size):
    grid = torch.arange(in_size, dtype=torch.float64)[None, None, :, None].expand(1, 1, in_size, 1)
    expected = torch.nn.functional.interpolate(grid, size=(out_size, 1), mode="nearest")[0, 0, :, 0].long()
    np.testing.assert_array_equal(torch_nearest_index(out_size, in_size), expected.numpy())


def test_fixed_size_geometry_follows_cutler():
    geometry = InputPolicy(0, 2048, 480, 14).geometry(375, 500)
    assert geometry.working == (480, 480) and geometry.network == (476, 476) and geometry.grid == (34, 34)
    rows, _ = working_to_patch(geometry)
    assert rows[0] == 0 and rows[-1] == 33 and rows[240] == 17


# ----------------------------------------------------------------------------- registry


def resolve(**overrides) -> dict:
    """`resolve_method` and `method_features` on flags as gen_masks.py parses them (None: left out): the
    resolved parameters, input and features."""
    values = dict(method="maskdistill", arch="vit_small", features="auto", heads=None, topk=None, k_patches=None,
                  tau=None, num_objects=None, foreground=None, resize=None, fixed_size=None, max_size=2048,
                  patch_size=16)
    values.update(overrides)
    settings = resolve_method(values["method"], values["arch"], values, values["resize"], values["fixed_size"],
                              values["max_size"], values["patch_size"])
    assert isinstance(settings, MethodSettings)
    return {**settings.params, "resize": settings.resize, "fixed_size": settings.fixed_size,
            "features": method_features(values["method"], values["arch"], values["features"])}


@pytest.mark.parametrize("method,expected", [
    ("maskdistill", dict(heads=5, topk=0.4, resize=640, fixed_size=0, tau=None, features="raw")),
    ("lost", dict(k_patches=100, resize=0, fixed_size=0, heads=None, features="raw")),
    ("tokencut", dict(tau=0.2, foreground="eigenvector", resize=0, fixed_size=0, features="raw")),
    ("maskcut", dict(tau=0.15, num_objects=3, foreground="eigenvector", mask_score="official", resize=0,
                     fixed_size=480, features="raw")),
])
def test_each_method_gets_its_official_defaults(method, expected):
    for arch in ("vit_small", "vit_base"):  # DINO: the official recipes, untouched
        resolved = resolve(method=method, arch=arch)
        assert {k: resolved.get(k) for k in expected} == expected


@pytest.mark.parametrize("method,expected", [
    ("maskdistill", dict(heads=5, topk=0.4, resize=640, fixed_size=0, features="centred")),
    ("lost", dict(k_patches=100, resize=320, fixed_size=0, features="centred_tokens")),
    ("tokencut", dict(tau=0.2, foreground="attention", resize=0, fixed_size=0, features="centred")),
    ("maskcut", dict(tau=0.15, num_objects=3, foreground="attention", mask_score="attention", resize=0,
                     fixed_size=480, features="centred")),
])
def test_dinov2_defaults_of_each_method_and_explicit_flags_win(method, expected):
    from distill.methods import method_defaults

    for arch in ("dinov2_vits14", "dinov2_vitb14_reg"):
        resolved = resolve(method=method, arch=arch, patch_size=14)
        assert {k: resolved.get(k) for k in expected} == expected
        assert method_defaults(method, arch) == {**load_method(method).params, **expected}
    given = (dict(features="raw", resize=0) | ({"foreground": "eigenvector"} if "foreground" in expected else {})
             | ({"mask_score": "official"} if "mask_score" in expected else {}))
    resolved = resolve(method=method, arch="dinov2_vits14", patch_size=14, **given)
    assert {k: resolved[k] for k in given} == given


def test_method_flags_are_checked():
    from utils.errors import UserError

    with pytest.raises(UserError, match="--tau applies to --method tokencut or maskcut"):
        resolve(method="lost", tau=0.3)
    with pytest.raises(UserError, match="exclude each other"):
        resolve(method="maskcut", resize=320, fixed_size=480)
    resolved = resolve(method="maskcut", resize=320)  # --resize alone replaces MaskCut's square
    assert (resolved["resize"], resolved["fixed_size"]) == (320, 0)
    assert set(method_names()) == {"maskdistill", "lost", "tokencut", "maskcut"}
    with pytest.raises(UserError, match="--foreground applies to --method tokencut or maskcut, not lost"):
        resolve(method="lost", foreground="attention")


def test_patch_keys_concatenate_heads_in_dino_order():
    key = torch.arange(2 * 3 * 5 * 4, dtype=torch.float32).reshape(2, 3, 5, 4)  # B, heads, 1 + N, d
    features = PatchFeatures(query=key, key=key, grid=(2, 2))
    # DINO: qkv[1] is (B, heads, T, d) -> transpose(1, 2) -> reshape(B, T, heads * d), CLS dropped
    expected = key.transpose(1, 2).reshape(2, 5, 12)[:, 1:]
    assert torch.equal(features.patch_keys, expected)


def test_maskcut_attention_score_ranks_the_attended_mask_first():
    """Two masks: a band that a cut separates cleanly and an object the CLS token attends to; `official` (1 -
    Ncut/2) and `attention` (mean attention over the mask, scaled to [0, 1] per image) rank them oppositely."""
    from distill.maskcut import attention_scores

    band, obj = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    band[0] = True
    obj[2:4, 1:3] = True
    attention = torch.full((1, 16), 2.0)
    attention[0, obj.reshape(-1)] = 6.0  # scaled: 1 on the object, 0 at the minimum
    attention[0, 1] = 4.0  # scaled 0.5, in the band
    (rescored,) = attention_scores([[PatchMask(band, 0.9), PatchMask(obj, 0.6)]], attention)
    assert rescored[0].score == pytest.approx(0.5 / 4) and rescored[1].score == pytest.approx(1.0)
    assert [m.mask.tolist() for m in rescored] == [band.tolist(), obj.tolist()]  # the masks and order untouched


def test_maskcut_mask_score_flag_selects_the_score(monkeypatch):
    from distill import maskcut as maskcut_module

    obj = block_mask((5, 5), [(1, 1), (1, 2)])
    features = PatchFeatures(query=torch.zeros(1, 1, 26, 4), key=torch.zeros(1, 1, 26, 4), grid=(5, 5))
    params = {"num_objects": 2, "tau": 0.15, "foreground": "eigenvector"}
    monkeypatch.setattr(maskcut_module, "maskcut", lambda *a, **k: [[PatchMask(obj, 0.3)]])
    assert load_method("maskcut").propose(features, {**params, "mask_score": "official"})[0][0].score == 0.3
    # attention on a flat CLS map (all 0 after scaling): score 0
    assert load_method("maskcut").propose(features, {**params, "mask_score": "attention"})[0][0].score == 0.0


def test_multi_mask_output_is_written_best_first(tmp_path):
    """The annotations of an image are in descending score, whatever order the method proposed them in."""
    from distill.data import InputPolicy as Policy
    from distill.engine import ImageJob, finish_image

    geometry = Policy(0, 2048, 0, 8).geometry(16, 16)
    first, second, third = (block_mask((2, 2), [cell]) for cell in [(0, 0), (0, 1), (1, 1)])
    proposals = [PatchMask(first, 0.2), PatchMask(second, 0.9), PatchMask(third, 0.5)]
    line, count = finish_image(ImageJob(0, {"id": 1, "file_name": "a.png", "height": 16, "width": 16}, geometry,
                                        proposals, "lost", "rle"))
    scores = [a["score"] for a in json.loads(line)["annotations"]]
    assert count == 3 and scores == [0.9, 0.5, 0.2]
