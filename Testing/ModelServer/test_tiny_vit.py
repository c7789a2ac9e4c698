"""TinyViT encoder (MobileSAM / LiteMedSAM): shapes, strict checkpoint loading, parameter
count, the eval-mode bias cache, gradients and bf16 autocast."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from desam_server.modeling.tiny_vit import TinyViT, lite_medsam_encoder, mobile_sam_encoder
from desam_server.modeling.tiny_vit_blocks import relative_offset_index

WEIGHTS_DIR = Path(os.environ.get("DESAM_WEIGHTS_DIR", "~/.cache/slicer-desam/weights")).expanduser()
CHECKPOINTS = {"mobile_sam": "mobile_sam.pt", "lite_medsam": "lite_medsam.pth"}
BUILDERS = {"mobile_sam": mobile_sam_encoder, "lite_medsam": lite_medsam_encoder}

# Measured: bf16 autocast vs fp32, relative Frobenius error, on the randomised small
# model below (img 224 / 256, seeds 0-2): neck output 0.0034-0.0047, taps 0.0019-0.0025.
# bf16 keeps 8 significand bits (unit roundoff 2^-8 = 0.0039), so per-element rounding of
# that order, partly averaging out and partly accumulating over the residual blocks, is
# what a correct model shows. 0.015 leaves ~3x headroom; the test guards autocast itself
# (dtype clashes between the fp32 bias table and bf16 activations, gross precision loss),
# not subtle indexing bugs, which the enumeration test and strict loading cover. The real
# checkpoints (larger activations, 12 blocks; checked outside the tests because a full
# forward costs seconds) show 0.017 (MobileSAM, 1024 px) and 0.031 (LiteMedSAM, 256 px)
# at the neck, the latter identical to what the reference TinyViT code gives.
BF16_REL_TOL = 0.015


def small_tiny_vit(img_size: int = 256) -> TinyViT:
    """Narrow TinyViT of the same structure (4 stages, windows 7/7/14/7). At 256 px the
    attention grids are 32/16/16 (all padded); at 224 px 28/14/14 (stage 2 = one window)."""
    return TinyViT(img_size=img_size, embed_dims=(16, 32, 40, 80), depths=(1, 2, 2, 1),
                   out_chans=32, patch_embed_kernel=3)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter and BatchNorm statistic off its initial value (zero-init
    residual branches and zero bias tables would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # norm scales / shifts, biases
                base = 1.0 if name.endswith(("bn.weight", "norm.weight")) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def encoder_state(name: str) -> dict[str, torch.Tensor]:
    path = WEIGHTS_DIR / CHECKPOINTS[name]
    if not path.is_file():
        pytest.skip(f"checkpoint {path} not present (set DESAM_WEIGHTS_DIR to the folder holding {path.name})")
    state = torch.load(path, map_location="cpu", weights_only=True)
    prefix = "image_encoder."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def test_offset_index_follows_checkpoint_enumeration():
    for window in (1, 2, 3, 7, 14):
        points = list(itertools.product(range(window), range(window)))
        seen: dict[tuple[int, int], int] = {}
        expected = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                expected.append(seen.setdefault(offset, len(seen)))
        expected_t = torch.tensor(expected).view(len(points), len(points))
        assert torch.equal(relative_offset_index(window), expected_t), window
        assert len(seen) == window * window


@pytest.mark.parametrize("name", ["mobile_sam", "lite_medsam"])
def test_full_size_shapes_and_attributes(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    side = 1024 if name == "mobile_sam" else 256
    assert model.img_size == side
    assert model.tap_channels == (128, 160, 320)
    assert model.tap_sizes == (128, 64, 64)
    assert model.embedding_size == 64
    with torch.no_grad():
        embedding, taps = model(torch.randn(1, 3, side, side))
    assert embedding.shape == (1, 256, 64, 64)
    assert [tuple(t.shape) for t in taps] == [(1, 128, 128, 128), (1, 160, 64, 64), (1, 320, 64, 64)]
    assert torch.isfinite(embedding).all() and all(torch.isfinite(t).all() for t in taps)


@pytest.mark.parametrize("img_size", [224, 256])
def test_small_model_shapes_match_attributes(img_size):
    model = randomise(small_tiny_vit(img_size)).eval()
    with torch.no_grad():
        embedding, taps = model(torch.randn(2, 3, img_size, img_size))
    e = model.embedding_size
    assert embedding.shape == (2, 32, e, e)
    shapes = [(2, c, s, s) for c, s in zip(model.tap_channels, model.tap_sizes, strict=True)]
    assert [tuple(t.shape) for t in taps] == shapes
    assert model.tap_channels == (32, 40, 80)
    assert model.tap_sizes == ((img_size // 8,) + (img_size // 16,) * 2)


def test_wrong_input_size_is_rejected():
    with pytest.raises(ValueError, match="256 x 256"):
        small_tiny_vit(256)(torch.zeros(1, 3, 224, 224))


@pytest.mark.realweights
@pytest.mark.parametrize("name", ["mobile_sam", "lite_medsam"])
def test_real_checkpoint_loads_strictly(name):
    state = encoder_state(name)
    model = BUILDERS[name]()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(state)
    assert not any("attention_bias_idxs" in k for k in state)
    assert ("head.weight" in state) == (name == "mobile_sam")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_parameter_counts():
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    mobile = mobile_sam_encoder()
    head = count(mobile.head) + count(mobile.norm_head)
    assert head == 320 * 1000 + 1000 + 2 * 320
    assert count(mobile) == 6_065_532  # with the unused ImageNet head, as in the checkpoint
    assert count(mobile) - head == 5_743_892
    assert abs(count(mobile) - 6.07e6) / 6.07e6 < 0.005
    lite = lite_medsam_encoder()
    # Same network without the head; 1x1 instead of 3x3 stem convolutions.
    stem_delta = (3 * 32 + 32 * 64) * (9 - 1)
    assert count(lite) == 5_743_892 - stem_delta == 5_726_740


def test_eval_and_train_mode_agree_and_follow_new_weights():
    model = randomise(small_tiny_vit(256)).eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ref, ref_taps = model(x)
        again, _ = model(x)
    assert torch.equal(again, ref)

    model.train()
    for m in model.modules():  # BatchNorm would use batch statistics in train mode
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    out, taps = model(x)  # train mode, autograd on: bias gathered afresh
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(taps, ref_taps, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # New bias tables take effect at once (nothing derived from them is kept).
    model.eval()
    with torch.no_grad():
        model(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for k in state:
            if k.endswith("attention_biases"):
                state[k] += 1.0 + torch.rand_like(state[k])
        model.load_state_dict(state, strict=True)
        changed, _ = model(x)
        fresh = small_tiny_vit(256).eval()
        fresh.load_state_dict(state, strict=True)
        expected, _ = fresh(x)
    assert not torch.allclose(changed, ref)
    torch.testing.assert_close(changed, expected, rtol=0, atol=0)


def test_gradients_reach_every_parameter_in_train_mode():
    model = randomise(small_tiny_vit(224)).train()
    embedding, taps = model(torch.randn(2, 3, 224, 224))
    loss = embedding.square().mean() + sum(t.square().mean() for t in taps)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if name.endswith("attention_biases"):
            assert p.grad.abs().sum() > 0, name


def test_eval_mode_with_autograd_does_not_use_a_stale_cache():
    # Fine-tuning with BatchNorm frozen (model.eval()) must still train the bias tables.
    model = randomise(small_tiny_vit(224)).eval()
    x = torch.randn(1, 3, 224, 224)
    for _ in range(2):
        model.zero_grad()
        embedding, _ = model(x)
        embedding.square().mean().backward()
        table = model.layers[2].blocks[0].attn.attention_biases
        assert table.grad is not None and table.grad.abs().sum() > 0


@pytest.mark.parametrize("img_size", [224, 256])
def test_bf16_autocast_is_close_to_fp32(img_size):
    model = randomise(small_tiny_vit(img_size), seed=1).eval()
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        ref, ref_taps = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, taps = model(x)
    assert out.dtype in (torch.bfloat16, torch.float32)
    assert rel_err(out, ref) < BF16_REL_TOL
    for a, b in zip(taps, ref_taps, strict=True):
        assert rel_err(a, b) < BF16_REL_TOL
