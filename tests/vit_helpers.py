"""Tiny stand-ins for every ViT arch (2 blocks, width 32): the same patch sizes, registers and
position-embedding rules as the real ones, built in milliseconds."""
from __future__ import annotations

import dataclasses

import pytest

import utils.vit_archs as vit_archs

TINY_WIDTH = 32


@pytest.fixture
def tiny_vits(monkeypatch):
    for arch, spec in list(vit_archs.BACKBONES.items()):
        tiny = dataclasses.replace(spec, timm_kwargs=(("embed_dim", TINY_WIDTH), ("depth", 2), ("num_heads", 2),
                                                      ("img_size", 5 * spec.patch_sizes[0])))
        monkeypatch.setitem(vit_archs.BACKBONES, arch, tiny)
