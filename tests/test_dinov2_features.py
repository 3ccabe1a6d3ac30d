"""distill/features.py: the per-backbone feature setting, and why DINOv2 needs centred keys,
on hand-made keys with a known answer."""
import numpy as np
import pytest
import torch

from distill.features import centre_keys, discovery_features, feature_setting, needs_tokens
from distill.maskgen import propose_masks
from utils.vit import LastBlockQK
from utils.vit_archs import ARCHS
from utils.errors import UserError


def test_auto_setting_per_backbone():
    assert {arch: feature_setting(arch) for arch in ARCHS} == {
        "vit_small": "raw", "vit_base": "raw", "dinov2_vits14": "centred", "dinov2_vitb14": "centred",
        "dinov2_vits14_reg": "centred", "dinov2_vitb14_reg": "centred"}
    assert feature_setting("dinov2_vits14", "raw") == "raw"
    assert feature_setting("vit_small", "centred") == "centred"
    assert feature_setting("dinov2_vits14", "centred_tokens") == "centred_tokens"
    with pytest.raises(UserError, match="unknown --features 'whitened'"):
        feature_setting("vit_small", "whitened")


def test_centring_subtracts_the_patch_mean_per_image_and_head():
    key = torch.tensor([[[[9.0, 9.0], [1.0, 2.0], [3.0, 6.0]]],  # image 0, one head: CLS, two patches
                        [[[0.0, 0.0], [2.0, 2.0], [2.0, 4.0]]]])  # image 1
    expected = torch.tensor([[[[7.0, 5.0], [-1.0, -2.0], [1.0, 2.0]]],
                             [[[-2.0, -3.0], [0.0, -1.0], [0.0, 1.0]]]])
    assert torch.equal(centre_keys(key), expected)
    assert centre_keys(key.bfloat16()).dtype == torch.float32
    query = torch.randn(2, 1, 3, 2)
    centred = discovery_features(LastBlockQK(query, key), "centred")
    assert centred.query is query and centred.key is key  # CLS attention keeps the raw keys
    assert torch.equal(centred.graph_key, expected)
    raw = discovery_features(LastBlockQK(query, key), "raw")
    assert raw.query is query and raw.key is key and raw.graph_key is key


def test_centred_tokens_graph_reads_the_output_tokens_centred():
    key = torch.randn(2, 1, 3, 2)
    query = torch.randn(2, 1, 3, 2)
    tokens = key.flip(-1) * 3  # any tensor other than the keys
    chosen = discovery_features(LastBlockQK(query, key, tokens), "centred_tokens")
    assert chosen.query is query and chosen.key is key  # CLS attention keeps the raw keys
    assert torch.equal(chosen.graph_key, centre_keys(tokens))
    assert needs_tokens("centred_tokens") and not needs_tokens("centred") and not needs_tokens("raw")
    with pytest.raises(ValueError, match="tokens=True"):
        discovery_features(LastBlockQK(query, key), "centred_tokens")


def common_component_keys(grid=6, heads=2):
    """DINOv2-like keys: a large component shared by every patch plus a small object or background
    direction. Object: the 2x3 block at rows 1-2, cols 1-3; the CLS query points at the object."""
    obj = np.zeros((grid, grid), dtype=bool)
    obj[1:3, 1:4] = True
    common, e_obj, e_bg = 10 * torch.eye(4)[0], torch.eye(4)[1], torch.eye(4)[2]
    patches = torch.stack([common + (e_obj if o else e_bg) for o in obj.reshape(-1)])
    key = torch.cat([common[None], patches]).repeat(heads, 1, 1)[None]  # (1, heads, 1 + N, 4)
    query = torch.zeros_like(key)
    query[:, :, 0] = e_obj + 0.01 * common
    return query, key, obj


def test_raw_common_component_gives_the_whole_image_and_centring_the_object():
    query, key, obj = common_component_keys()
    assert (key[0, 0, 1:] @ key[0, 0, 1:].T > 0).all()  # every raw key product is positive
    # Raw CLS attention in both: object patches score 2, background 1. The mass threshold keeps the
    # top half of the mass (42 / 2 = 21): the object's 12 and 9 background patches, so the object's
    # share of the kept mass is 12 / 21.
    for setting, expected, score in (("raw", np.ones_like(obj), 1.0), ("centred", obj, 12 / 21)):
        features = discovery_features(LastBlockQK(query, key), setting)
        (proposal,) = propose_masks(features.query, features.key, 6, 6, graph_key=features.graph_key)
        np.testing.assert_array_equal(proposal.mask, expected)
        assert proposal.seed_patch == (1, 1)
        assert proposal.score == pytest.approx(score)
