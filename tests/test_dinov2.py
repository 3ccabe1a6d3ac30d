"""DINOv2 backbones: the official key layout (strict loads), register tokens, the official
position-embedding interpolation, patch-size rules and the offline error.

Tiny DINOv2-layout models (2 blocks, width 32, a 5x5 position grid) keep these tests fast; the
real ViT-S/14 is checked in tests/test_dinov2_real.py.
"""
import pytest
import torch

import utils.vit_archs as vit_archs
from dinov2_reference import official_forward, official_interpolation, official_layout_state
from distill.reference import explicit_last_qk
from utils.vit import DinoViT, build_vit, interpolate_pos_encoding
from utils.vit_archs import BackboneSpec, resolve_patch_size
from utils.errors import UserError

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 70}  # 70 / 14 = a 5x5 grid


@pytest.fixture
def tiny_archs(monkeypatch):
    """Two tiny DINOv2 archs: plain (offset 0.1) and with 4 registers (offset 0, antialias)."""
    plain = BackboneSpec("DINOv2", "vit_small_patch14_dinov2", (14,), {14: "https://example.invalid/tiny.pth"},
                         mask_token=True, timm_kwargs=tuple(TINY.items()))
    registers = BackboneSpec("DINOv2", "vit_small_patch14_dinov2", (14,), {14: "https://example.invalid/tiny_reg4.pth"},
                             register_tokens=4, interpolate_offset=0.0, interpolate_antialias=True, mask_token=True,
                             timm_kwargs=tuple(TINY.items()))
    monkeypatch.setitem(vit_archs.BACKBONES, "tiny_dinov2", plain)
    monkeypatch.setitem(vit_archs.BACKBONES, "tiny_dinov2_reg", registers)


# ----------------------------------------------------------------------------- key layout and loading


@pytest.mark.parametrize("arch,registers", [("dinov2_vits14", 0), ("dinov2_vits14_reg", 4)])
def test_timm_model_has_exactly_the_official_dinov2_keys(arch, registers):
    with torch.device("meta"):  # shapes and names only: no memory, no init time
        state = DinoViT(arch).vit.state_dict()
    expected = set(official_layout_state(registers, depth=12))
    assert set(state) == expected
    assert state["pos_embed"].shape == (1, 1370, 384) and state["mask_token"].shape == (1, 384)
    if registers:
        assert state["register_tokens"].shape == (1, 4, 384)


def test_official_urls_and_interpolation_settings():
    base = "https://dl.fbaipublicfiles.com/dinov2"
    assert {a: vit_archs.BACKBONES[a].urls for a in vit_archs.ARCHS if a.startswith("dinov2")} == {
        "dinov2_vits14": {14: f"{base}/dinov2_vits14/dinov2_vits14_pretrain.pth"},
        "dinov2_vitb14": {14: f"{base}/dinov2_vitb14/dinov2_vitb14_pretrain.pth"},
        "dinov2_vits14_reg": {14: f"{base}/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"},
        "dinov2_vitb14_reg": {14: f"{base}/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"}}
    for arch in ("dinov2_vits14", "dinov2_vitb14"):
        spec = vit_archs.BACKBONES[arch]
        assert (spec.register_tokens, spec.interpolate_offset, spec.interpolate_antialias) == (0, 0.1, False)
        spec = vit_archs.BACKBONES[arch + "_reg"]
        assert (spec.register_tokens, spec.interpolate_offset, spec.interpolate_antialias) == (4, 0.0, True)


@pytest.mark.parametrize("arch,registers", [("tiny_dinov2", 0), ("tiny_dinov2_reg", 4)])
def test_official_layout_checkpoint_loads_strictly(tiny_archs, tmp_path, arch, registers):
    state = official_layout_state(registers)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    model = build_vit(arch, None, str(path))
    loaded = model.vit.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def test_missing_or_extra_keys_are_named(tiny_archs, tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(official_layout_state(0), path)
    with pytest.raises(UserError, match=r"DINOv2 tiny_dinov2_reg/14 layout: missing \['register_tokens'\]"):
        build_vit("tiny_dinov2_reg", None, str(path))
    torch.save(official_layout_state(4), path)
    with pytest.raises(UserError, match=r"missing \[\], unexpected \['register_tokens'\]"):
        build_vit("tiny_dinov2", None, str(path))


# ----------------------------------------------------------------------------- forward and registers


@pytest.mark.parametrize("arch,registers,offset,antialias",
                         [("tiny_dinov2", 0, 0.1, False), ("tiny_dinov2_reg", 4, 0.0, True)])
@pytest.mark.parametrize("height,width", [(70, 70), (42, 98), (98, 56)])
def test_forward_matches_the_official_definition_without_registers(tiny_archs, tmp_path, arch, registers, offset,
                                                                  antialias, height, width):
    state = official_layout_state(registers)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    model = build_vit(arch, None, str(path))
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        (q, k), tokens = official_forward(state, images, 2, offset, antialias)
        qk = model.last_qk(images)
        explicit = explicit_last_qk(model, images)
        cls = model.cls_features(images)
    n = (height // 14) * (width // 14)
    keep = [0, *range(1 + registers, 1 + registers + n)]  # CLS and patches, never the registers
    assert qk.key.shape == (2, 2, 1 + n, 16)
    torch.testing.assert_close(qk.query, q[:, :, keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(qk.key, k[:, :, keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(explicit.key, k[:, :, keep], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cls, tokens[:, 0], rtol=1e-4, atol=1e-5)


def test_registers_take_part_in_attention(tiny_archs, tmp_path):
    """Registers are dropped from the outputs, not from the network: changing them changes the keys."""
    state = official_layout_state(4)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    model = build_vit("tiny_dinov2_reg", None, str(path))
    images = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        before = model.last_qk(images).key
        model.vit.register_tokens.mul_(-3)
        after = model.last_qk(images).key
    assert before.shape == after.shape == (1, 2, 17, 16)
    assert (before - after).abs().max() > 1e-3


# ----------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("offset,antialias", [(0.1, False), (0.0, True), (0.0, False)])
@pytest.mark.parametrize("height,width", [(518, 518), (480, 644), (644, 434), (224, 224), (154, 322), (14, 14)])
def test_interpolation_matches_the_official_formula(offset, antialias, height, width):
    pos = torch.randn(1, 1370, 8, generator=torch.Generator().manual_seed(1))
    ours = interpolate_pos_encoding(pos, height // 14, width // 14, offset, antialias)
    reference = official_interpolation(pos, (1, 3, height, width), 14, offset, antialias)
    assert ours.shape == (1, 1 + (height // 14) * (width // 14), 8)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert torch.equal(ours[:, 0], pos[:, 0])


def test_offset_and_antialias_change_the_embeddings():
    """The three official variants really differ: offset 0.1 vs an exact size (upsampling), and
    antialias when shrinking, so a wrong setting cannot pass the test above by accident."""
    pos = torch.randn(1, 1370, 8, generator=torch.Generator().manual_seed(1))
    assert (interpolate_pos_encoding(pos, 46, 61, 0.1) - interpolate_pos_encoding(pos, 46, 61, 0.0)).abs().max() > 1e-3
    assert (interpolate_pos_encoding(pos, 11, 23, 0.0, True)
            - interpolate_pos_encoding(pos, 11, 23, 0.0, False)).abs().max() > 1e-2


# ----------------------------------------------------------------------------- arch / patch size, offline


def test_patch_size_follows_the_arch():
    assert resolve_patch_size("dinov2_vits14", None) == 14
    assert resolve_patch_size("dinov2_vitb14_reg", 14) == 14
    assert resolve_patch_size("vit_small", None) == 16
    assert resolve_patch_size("vit_base", 8) == 8
    with pytest.raises(UserError, match=r"--arch dinov2_vits14 has patch size 14, not --patch_size 16"):
        resolve_patch_size("dinov2_vits14", 16)
    with pytest.raises(UserError, match=r"--arch vit_small has patch size 16 or 8, not --patch_size 14"):
        resolve_patch_size("vit_small", 14)
    with pytest.raises(UserError, match="unknown --arch 'dinov3'"):
        resolve_patch_size("dinov3", None)


@pytest.mark.parametrize("arch,file", [("dinov2_vits14", "dinov2_vits14_pretrain.pth"),
                                       ("dinov2_vitb14_reg", "dinov2_vitb14_reg4_pretrain.pth")])
def test_offline_without_cache_gives_the_dino_error(tmp_path, monkeypatch, arch, file):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as error:
        build_vit(arch, None, "dino")
    assert str(error.value) == (
        f"cannot download the DINOv2 {arch}/14 weights (OSError) and no cached copy is at "
        f"{tmp_path / 'checkpoints' / file}; download https://dl.fbaipublicfiles.com/dinov2/{arch[:13]}/{file} "
        "and pass --weights PATH")
