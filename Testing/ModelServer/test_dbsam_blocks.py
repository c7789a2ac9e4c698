"""DB-SAM's building blocks: shapes, identities, the deformable attention against a dense
reference, the fusion formula, and parameter counts per registry encoder."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from desam_server.modeling.dbsam_channel_attention import ChannelAttentionBlock
from desam_server.modeling.dbsam_conv_branch import ConvBranch
from desam_server.modeling.dbsam_cross_attention import BilateralCrossAttention
from desam_server.modeling.dbsam_fusion import ViTConvFusion
from desam_server.modeling.dbsam_parameters import dbsam_block_parameters, dbsam_layout
from desam_server.modeling.deformable_attention import MultiScaleDeformableAttention, grid_reference_points


def _randomised(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


# ---------------------------------------------------------------- channel attention block

def test_fresh_channel_attention_is_identity_in_train_and_eval():
    block = ChannelAttentionBlock(32)
    x = torch.randn(2, 6, 5, 32)
    assert torch.equal(block.train()(x), x)
    assert torch.equal(block.eval()(x), x)


def test_channel_attention_shape_and_drop_path_only_in_training():
    torch.manual_seed(0)
    block = ChannelAttentionBlock(32, drop_path=0.4)
    nn.init.normal_(block.project.weight, std=0.1)
    x = torch.randn(64, 4, 4, 32)
    block.eval()
    out_eval = block(x)
    assert out_eval.shape == x.shape
    assert torch.equal(block(x), out_eval)
    assert not torch.allclose(out_eval, x)
    block.train()
    out_train = block(x)
    dropped = [bool(torch.equal(out_train[i], x[i])) for i in range(64)]
    assert 5 < sum(dropped) < 59  # about 40 % of the samples skip the adapter branch
    kept = dropped.index(False)
    # a kept sample's branch is scaled by 1 / (1 - 0.4)
    torch.testing.assert_close(out_train[kept] - x[kept], (out_eval[kept] - x[kept]) / 0.6)


def test_channel_attention_formula():
    block = _randomised(ChannelAttentionBlock(16, se_reduction=4)).eval()
    x = torch.randn(2, 5, 6, 16)
    f = nn.functional.layer_norm(x, (16,), block.norm.weight, block.norm.bias, block.norm.eps).permute(0, 3, 1, 2)
    f = nn.functional.conv2d(f, block.dwconv.weight, block.dwconv.bias, padding=1, groups=16)
    s = torch.sigmoid(block.se.fc2(torch.relu(block.se.fc1(f.mean(dim=(2, 3))))))
    f = nn.functional.conv2d(f * s[:, :, None, None], block.project.weight, block.project.bias)
    torch.testing.assert_close(block(x), x + f.permute(0, 2, 3, 1))


def test_blocks_leave_callers_frozen_modules_alone():
    """Every block is trainable as built and gets gradients through a frozen caller's
    module, whose parameters stay frozen and gradient-free (no block sets requires_grad)."""
    frozen = nn.Linear(16, 16)
    frozen.requires_grad_(False)
    adapter = ChannelAttentionBlock(16, zero_init=False).train()
    branch = ConvBranch(16, 4, widths=(8, 8)).train()
    cross = BilateralCrossAttention(16, 16, deep_heads=2, shallow_heads=2).train()
    fusion = ViTConvFusion(16).train()
    deep = adapter(frozen(torch.randn(2, 4, 4, 16)))
    deep, shallow = cross(deep, branch(torch.randn(2, 3, 32, 32)))
    fusion(deep, shallow).square().sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    for block in (adapter, branch, cross, fusion):
        assert all(p.requires_grad and p.grad is not None for p in block.parameters())


# ---------------------------------------------------------------- convolution branch

def test_conv_branch_reaches_the_token_grid():
    branch = ConvBranch(32, 16, widths=(8, 16)).eval()
    assert branch(torch.randn(2, 3, 256, 256)).shape == (2, 32, 16, 16)
    assert branch(torch.randn(1, 3, 64, 64)).shape == (1, 32, 16, 16)  # already 4E: no resize
    kinds = [(m.kernel_size, m.stride) for m in branch.modules() if isinstance(m, nn.Conv2d)]
    assert kinds == [((3, 3), (2, 2)), ((1, 1), (1, 1)), ((3, 3), (2, 2)), ((1, 1), (1, 1)), ((1, 1), (1, 1))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in branch.modules()) == 4


def test_conv_branch_sam_input_gives_64_grid():
    branch = ConvBranch(768, 64).eval()
    with torch.no_grad():
        assert branch(torch.randn(1, 3, 1024, 1024)).shape == (1, 768, 64, 64)


# ---------------------------------------------------------------- deformable attention

def _bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value: D x H x W; (x, y) normalised; zero outside; the four neighbours, one by one."""
    d, h, w = value.shape
    px, py = x * w - 0.5, y * h - 0.5  # pixel centres at integers
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(d, dtype=value.dtype)
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < w and 0 <= yi < h:
            out = out + weight * value[:, yi, xi]
    return out


def _dense_reference(attn: MultiScaleDeformableAttention, query, ref, value, shapes):
    b, nq, c = query.shape
    m, n_levels, k = attn.num_heads, attn.num_levels, attn.num_points
    d = c // m
    v = attn.value_proj(value)
    offsets = attn.sampling_offsets(query).view(b, nq, m, n_levels, k, 2)
    logits = attn.attention_weights(query).view(b, nq, m, n_levels * k)
    out = torch.zeros(b, nq, c, dtype=query.dtype)
    for bi in range(b):
        for qi in range(nq):
            for mi in range(m):
                weights = torch.exp(logits[bi, qi, mi]) / torch.exp(logits[bi, qi, mi]).sum()
                acc = torch.zeros(d, dtype=query.dtype)
                start = 0
                for li, (h, w) in enumerate(shapes):
                    level = v[bi, start:start + h * w, mi * d:(mi + 1) * d].T.reshape(d, h, w)
                    for ki in range(k):
                        x = float(ref[bi, qi, li, 0] + offsets[bi, qi, mi, li, ki, 0] / w)
                        y = float(ref[bi, qi, li, 1] + offsets[bi, qi, mi, li, ki, 1] / h)
                        acc = acc + weights[li * k + ki] * _bilinear(level, x, y)
                    start += h * w
                out[bi, qi, mi * d:(mi + 1) * d] = acc
    return attn.output_proj(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_deformable_attention_equals_dense_reference_on_two_levels(dtype):
    torch.manual_seed(1)
    shapes = [(4, 5), (2, 3)]
    attn = MultiScaleDeformableAttention(8, num_heads=2, num_levels=2, num_points=3, value_dim=6)
    with torch.no_grad():  # offsets large enough to leave the maps (zero padding is exercised)
        attn.sampling_offsets.weight.normal_(0.0, 1.5)
        attn.attention_weights.weight.normal_(0.0, 1.0)
    attn = attn.to(dtype)
    query = torch.randn(2, 3, 8, dtype=dtype)
    ref = torch.rand(2, 3, 2, 2, dtype=dtype)
    value = torch.randn(2, 4 * 5 + 2 * 3, 6, dtype=dtype)
    with torch.no_grad():
        got = attn(query, ref, value, shapes)
        want = _dense_reference(attn, query, ref, value, shapes)
    assert got.shape == (2, 3, 8)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_deformable_attention_at_pixel_centres_reads_the_pixel():
    h, w, c = 3, 4, 4
    attn = MultiScaleDeformableAttention(c, num_heads=1, num_levels=1, num_points=2)
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.zero_()
        for linear in (attn.value_proj, attn.output_proj):
            linear.weight.copy_(torch.eye(c))
            linear.bias.zero_()
    value = torch.randn(1, h * w, c)
    ref = grid_reference_points(h, w)[None]
    out = attn(torch.randn(1, h * w, c), ref, value, [(h, w)])
    torch.testing.assert_close(out, value)


def test_deformable_attention_gradcheck_and_parameter_gradients():
    torch.manual_seed(2)
    attn = MultiScaleDeformableAttention(4, num_heads=2, num_levels=2, num_points=2).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_(0.0, 0.5)
    shapes = [(3, 3), (2, 2)]
    query = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)
    ref = (torch.rand(1, 2, 2, 2, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    value = torch.randn(1, 13, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, r, v: attn(q, r, v, shapes), (query, ref, value))
    attn(query, ref, value, shapes).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


# ---------------------------------------------------------------- cross-attention, fusion

def test_bilateral_cross_attention_shapes_across_grids_and_widths():
    block = BilateralCrossAttention(16, 24, deep_heads=2, shallow_heads=4).eval()
    deep, shallow = torch.randn(2, 8, 8, 16), torch.randn(2, 24, 4, 4)
    new_deep, new_shallow = block(deep, shallow)
    assert new_deep.shape == deep.shape and new_shallow.shape == shallow.shape
    (new_deep.sum() + new_shallow.sum()).backward()
    assert all(p.grad is not None for p in block.parameters())


def test_fusion_from_known_logits():
    fusion = ViTConvFusion(4, reduction=2)
    a_d, a_s = torch.tensor([0.0, 1.0, -2.0, 3.0]), torch.tensor([0.0, 1.0, 0.5, -3.0])
    with torch.no_grad():
        for attention, logits in ((fusion.deep_attention, a_d), (fusion.shallow_attention, a_s)):
            attention.up.weight.zero_()
            attention.up.bias.copy_(logits)
    deep, shallow = torch.randn(1, 3, 3, 4), torch.randn(1, 4, 3, 3)
    m = torch.sigmoid(a_d + a_s)  # 0.5, 0.881, 0.182, 0.5
    want = deep * m + shallow.permute(0, 2, 3, 1) * (1 - m)
    torch.testing.assert_close(fusion(deep, shallow), want)


def test_fusion_gate_uses_global_average_pooling():
    fusion = _randomised(ViTConvFusion(8, reduction=4))
    deep, shallow = torch.randn(2, 5, 5, 8), torch.randn(2, 8, 5, 5)
    def logits(att, x):
        return att.up(nn.functional.gelu(att.down(x.mean(dim=(1, 2)))))
    want = torch.sigmoid(logits(fusion.deep_attention, deep)
                         + logits(fusion.shallow_attention, shallow.permute(0, 2, 3, 1)))
    torch.testing.assert_close(fusion.gate(deep, shallow.permute(0, 2, 3, 1)), want)


# ---------------------------------------------------------------- parameter counts

def _cab(c):  # LN 2C + DWConv 9C+C + SE (C*s+s + s*C+C) + Conv1x1 C*C+C, s = C // 16
    s = c // 16
    return 2 * c + 10 * c + (2 * c * s + s + c) + (c * c + c)


def _conv(out):  # 3x3 3->256 + BN, 1x1 256->256 + BN, 3x3 256->512 + BN, 1x1 512->512 + BN, 1x1 512->out + bias
    return 3 * 256 * 9 + 512 + 256 * 256 + 512 + 256 * 512 * 9 + 1024 + 512 * 512 + 1024 + 512 * out + out


def _layer(c, cv, heads):  # LNs (q, v, ffn) + offsets (8M per query channel) + weights (4M) + value + output + FFN C/4
    h = c // 4
    attn = (c * 8 * heads + 8 * heads) + (c * 4 * heads + 4 * heads) + (cv * c + c) + (c * c + c)
    return 2 * c + 2 * cv + 2 * c + attn + (c * h + h + h * c + c)


def _fusion(c):  # two channel-attention layers: C*s+s + s*C+C, s = C // 16
    s = c // 16
    return 2 * (2 * c * s + s + c)


# encoder: (adapter widths, [(stage width, heads)], shallow width, shallow heads)
LAYOUTS = {
    "vit_b": ([768] * 12, [(768, 12)] * 4, 768, 12),
    "vit_l": ([1024] * 24, [(1024, 16)] * 4, 1024, 16),
    "vit_h": ([1280] * 32, [(1280, 16)] * 4, 1280, 16),
    "mobile_sam": ([128] * 2 + [160] * 6 + [320] * 2, [(128, 4), (160, 5), (320, 10)], 320, 10),
}
# totals from the formulas above; ViT-B: adapters 12 x 674,352; conv 1,517,312 + 513 x 768;
# cross-attention 4 x 2 x 1,592,400; fusion 2 x (2 x 768 x 48 + 48 + 768)
TOTALS = {"vit_b": 22_891_808, "vit_l": 53_585_792, "vit_h": 96_975_008, "mobile_sam": 3_424_848}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parameter_counts_per_encoder(name):
    widths, stages, shallow, shallow_heads = LAYOUTS[name]
    layout = dbsam_layout(name)
    assert list(layout.adapter_dims) == widths
    assert [(s.dim, s.heads) for s in layout.stages] == stages
    assert (layout.shallow_dim, layout.shallow_heads, layout.grid_size) == (shallow, shallow_heads, 64)
    counts = dbsam_block_parameters(name)
    assert counts.adapters == sum(_cab(c) for c in widths)
    assert counts.conv_branch == _conv(shallow)
    assert counts.cross_attention == sum(_layer(c, shallow, h) + _layer(shallow, c, shallow_heads) for c, h in stages)
    assert counts.fusion == _fusion(shallow)
    assert counts.total == TOTALS[name]


def test_vit_b_stages_split_at_global_attention_blocks():
    assert [s.blocks for s in dbsam_layout("vit_b").stages] == [(0, 1, 2), (3, 4, 5), (6, 7, 8), (9, 10, 11)]
