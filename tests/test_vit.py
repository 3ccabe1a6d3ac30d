"""DINO ViT: official key layout round trip, DINO's position-embedding interpolation, fused forward."""
import math

import pytest
import torch
import torch.nn.functional as F

from distill.reference import explicit_last_qk
from utils.vit import DinoViT, build_vit, interpolate_pos_encoding, load_dino_state_dict
from utils.errors import UserError

DINO_KEYS_ViT_S = (
    {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    | {f"blocks.{i}.{m}.{p}" for i in range(12)
       for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
)


@pytest.fixture(scope="module")
def vit_s16():
    torch.manual_seed(0)
    model = DinoViT("vit_small", 16).eval()
    with torch.no_grad():  # non-trivial position embeddings so that interpolation matters
        model.vit.pos_embed.normal_(std=0.5)
    return model


def test_timm_model_has_exactly_the_official_dino_keys(vit_s16):
    assert set(vit_s16.vit.state_dict()) == DINO_KEYS_ViT_S


@pytest.mark.parametrize("wrap", ["bare", "teacher"])
def test_dino_checkpoint_round_trip(vit_s16, tmp_path, wrap):
    state = {k: v.clone() for k, v in vit_s16.vit.state_dict().items()}
    if wrap == "teacher":  # a full DINO training checkpoint: teacher/backbone. prefix plus a head
        state = {"teacher": {**{f"backbone.{k}": v for k, v in state.items()},
                             "head.mlp.0.weight": torch.zeros(3, 3)}, "epoch": 100}
    path = tmp_path / "dino_deitsmall16_pretrain.pth"
    torch.save(state, path)
    loaded = build_vit("vit_small", 16, str(path))
    for key, value in vit_s16.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 96)
    assert torch.equal(loaded.cls_features(x), vit_s16.cls_features(x))


def test_wrong_architecture_checkpoint_is_a_clear_error(vit_s16, tmp_path):
    path = tmp_path / "small.pth"
    torch.save(vit_s16.vit.state_dict(), path)
    with pytest.raises(UserError, match="embedding size"):
        build_vit("vit_base", 16, str(path))
    with pytest.raises(UserError, match="patch size"):
        build_vit("vit_small", 8, str(path))
    with pytest.raises(UserError, match="no such file"):
        build_vit("vit_small", 16, str(tmp_path / "missing.pth"))


def test_unreadable_or_non_dict_checkpoint_names_the_file(tmp_path):
    corrupt, listed = tmp_path / "corrupt.pth", tmp_path / "listed.pth"
    corrupt.write_bytes(b"not a torch file")
    torch.save([1, 2], listed)
    with pytest.raises(UserError, match=r"cannot read --weights checkpoint .*corrupt\.pth"):
        build_vit("vit_small", 16, str(corrupt))
    with pytest.raises(UserError, match=r"--weights checkpoint .*listed\.pth holds a list, not a dict"):
        build_vit("vit_small", 16, str(listed))


def test_offline_without_cache_says_how_to_pass_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="--weights PATH"):
        load_dino_state_dict("vit_small", 16)


def dino_reference_interpolation(pos_embed, height, width, patch_size):
    """DINO's vision_transformer.interpolate_pos_encoding, written out from its definition:
    w0, h0 = H // p + 0.1, W // p + 0.1; bicubic with scale_factor (w0 / sqrt(N), h0 / sqrt(N))."""
    n = pos_embed.shape[1] - 1
    if (height // patch_size) * (width // patch_size) == n and height == width:
        return pos_embed
    dim = pos_embed.shape[-1]
    w0, h0 = height // patch_size + 0.1, width // patch_size + 0.1
    grid = pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


@pytest.mark.parametrize("height,width", [(480, 640), (640, 427), (224, 224), (32, 48), (16, 16)])
def test_position_interpolation_matches_dino_formula(vit_s16, height, width):
    pos = vit_s16.vit.pos_embed.detach()
    ours = interpolate_pos_encoding(pos, height // 16, width // 16)
    assert ours.shape == (1, 1 + (height // 16) * (width // 16), 384)
    torch.testing.assert_close(ours, dino_reference_interpolation(pos, height, width, 16), rtol=0, atol=1e-6)
    assert torch.equal(ours[:, 0], pos[:, 0])  # the CLS embedding is never resampled


def test_dino_interpolation_differs_from_plain_size_resampling(vit_s16):
    pos = vit_s16.vit.pos_embed.detach()
    grid = pos[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2)
    by_size = F.interpolate(grid, size=(30, 40), mode="bicubic").permute(0, 2, 3, 1).reshape(1, -1, 384)
    ours = interpolate_pos_encoding(pos, 30, 40)[:, 1:]
    assert (ours - by_size).abs().max() > 1e-3


def test_fused_forward_equals_explicit_attention(vit_s16):
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        fused = vit_s16.last_qk(x)
        explicit = [explicit_last_qk(vit_s16, x[i:i + 1]) for i in range(2)]
    for i in range(2):
        torch.testing.assert_close(fused.query[i], explicit[i].query[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.key[i], explicit[i].key[0], rtol=1e-4, atol=1e-4)


def test_cls_features_match_timm_at_native_resolution(vit_s16):
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(vit_s16.cls_features(x), vit_s16.vit.forward_features(x)[:, 0])


def test_random_weights_warn_loudly(capsys):
    build_vit("vit_small", 16, "random")
    assert "RANDOM weights" in capsys.readouterr().err
