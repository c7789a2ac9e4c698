"""Model structure: parameter counts, tap capture, PRIM and PDMM shapes and semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from desam_server.modeling import ENCODERS, PDMM, build_decoders, count_parameters, get_spec
from desam_server.modeling.pdmm import SEResBlock


def test_vit_h_decoder_parameter_counts_match_the_paper():
    prim, pdmm = build_decoders("vit_h")
    n_prim, n_pdmm = count_parameters(prim), count_parameters(pdmm)
    assert n_prim == pytest.approx(3.43e6, rel=0.005)
    assert n_pdmm == pytest.approx(9.73e6, rel=0.005)
    assert n_prim + n_pdmm == pytest.approx(13.16e6, rel=0.005)
    # Nine SE residual blocks in all (3 encoder stages: 1 + 2 + 3, fusion, 2 up-blocks).
    assert sum(isinstance(m, SEResBlock) for m in pdmm.modules()) == 9


@pytest.mark.parametrize("name,width", [("vit_h", 1280), ("vit_l", 1024), ("vit_b", 768), ("mobile_sam", None)])
def test_pdmm_input_widths_come_from_the_encoder(name, width):
    spec = get_spec(name)
    _, pdmm = build_decoders(name)
    first_convs = [stage.project.conv1 for stage in pdmm.stages]
    # Stage d reads tap -(d+1): deepest tap first.
    assert [c.in_channels for c in first_convs] == list(reversed(spec.tap_channels))
    if width is not None:
        assert spec.tap_channels == (width,) * 3
    assert [c.out_channels for c in first_convs] == [256, 128, 64]


def test_pdmm_feeds_taps_at_native_resolution_and_rejects_bad_sides():
    # TinyViT-like taps: shallow 16x16, then 8x8, 8x8 for an 8x8 embedding.
    pdmm = PDMM(tap_channels=(12, 20, 40), tap_sizes=(16, 8, 8), embedding_size=8, widths=(32, 16, 16))
    assert [len(s.ups) for s in pdmm.stages] == [0, 1, 1]
    taps = [torch.randn(2, 12, 16, 16), torch.randn(2, 20, 8, 8), torch.randn(2, 40, 8, 8)]
    out = pdmm(torch.randn(2, 256, 8, 8), taps)
    assert out.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="power of two"):
        PDMM(tap_channels=(8, 8, 8), tap_sizes=(24, 8, 8), embedding_size=8)
    with pytest.raises(ValueError, match="does not have side"):
        pdmm.encode_image([torch.randn(1, 12, 8, 8), taps[1][:1], taps[2][:1]])


def test_pdmm_skips_are_prompt_independent():
    """decode(skips computed once, broadcast) == full forward per prompt."""
    torch.manual_seed(0)
    pdmm = PDMM(tap_channels=(32, 32, 32), tap_sizes=(16, 16, 16), embedding_size=16).eval()
    taps = [torch.randn(1, 32, 16, 16) for _ in range(3)]
    mask_embeddings = torch.randn(5, 256, 16, 16)
    with torch.no_grad():
        once = pdmm.decode(mask_embeddings, pdmm.encode_image(taps))
        each = torch.cat([pdmm(mask_embeddings[i : i + 1], taps) for i in range(5)])
    assert once.shape == (5, 1, 64, 64)
    torch.testing.assert_close(once, each, rtol=1e-5, atol=1e-5)


def test_tapped_encoder_returns_segment_anythings_embedding_and_the_raw_block_outputs(tiny_model):
    from segment_anything.modeling import ImageEncoderViT

    enc = tiny_model.image_encoder
    x = torch.randn(1, 3, 256, 256)
    captured = []  # the reference taps: the tapped blocks' outputs, caught by this test's own hooks
    handles = [enc.blocks[i].register_forward_hook(lambda _m, _a, out: captured.append(out.permute(0, 3, 1, 2)))
               for i in enc.tap_blocks]
    try:
        with torch.no_grad():
            reference = ImageEncoderViT.forward(enc, x)  # segment_anything's own forward
            expected = list(captured)
            embedding, taps = enc(x)
    finally:
        for handle in handles:
            handle.remove()
    assert enc.tap_blocks == (1, 3, 5)  # the first three global-attention blocks
    assert embedding.shape == (1, 256, 16, 16)
    assert [t.shape for t in taps] == [(1, 32, 16, 16)] * 3
    for got, want in zip(taps, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(embedding, reference, rtol=0, atol=0)
    # The encoder carries no hooks of its own.
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in enc.modules())


def test_vit_registry_tap_blocks_are_the_first_three_global_blocks():
    assert get_spec("vit_h").tap_indices == (7, 15, 23)
    assert get_spec("vit_l").tap_indices == (5, 11, 17)
    assert get_spec("vit_b").tap_indices == (2, 5, 8)
    with pytest.raises(ValueError, match="unknown encoder"):
        get_spec("vit_x")
    assert set(ENCODERS) >= {"vit_h", "vit_l", "vit_b", "mobile_sam", "lite_medsam", "tiny"}


def test_prim_starts_from_sam_decoder_and_matches_its_iou(tiny_model):
    m = tiny_model
    for name in ("iou_token", "mask_tokens", "transformer", "iou_prediction_head"):
        pairs = zip(getattr(m.prim, name).state_dict().items(), getattr(m.mask_decoder, name).state_dict().items(),
                    strict=True)
        for (k, a), (_, b) in pairs:
            assert torch.equal(a, b), f"{name}.{k}"
    # PRIM has no upscaling / hypernetwork layers.
    assert not any("output_upscaling" in k or "hypernetworks" in k for k in m.prim.state_dict())
    torch.manual_seed(1)
    embedding = torch.randn(1, 256, 16, 16)
    pts = (torch.rand(3, 1, 2) * 256, torch.ones(3, 1, dtype=torch.int))
    with torch.no_grad():
        iou, _ = m.desam_decode(embedding, m.image_skips([torch.randn(1, 32, 16, 16)] * 3), points=pts)
        _, sam_iou = m.sam_decode(embedding, points=pts, boxes=None, mask_input=None, multimask_output=False)
    torch.testing.assert_close(iou, sam_iou[:, 0], rtol=1e-5, atol=1e-5)


def test_desam_output_shapes_and_trainable_set(tiny_model):
    m = tiny_model
    assert count_parameters(m.prim) + count_parameters(m.pdmm) == sum(p.numel() for p in m.trainable_parameters())
    frozen = [m.image_encoder, m.prompt_encoder, m.mask_decoder]
    assert not any(p.requires_grad for mod in frozen for p in mod.parameters())
    assert all(p.requires_grad for p in m.trainable_parameters())
    with torch.no_grad():
        emb, taps = m.encode(torch.randn(2, 3, 256, 256))
        boxes = torch.tensor([[0.0, 0.0, 255.0, 255.0], [10.0, 20.0, 100.0, 120.0]])
        iou, logits = m.desam_forward(emb, taps, boxes=boxes)
    assert iou.shape == (2,) and logits.shape == (2, 1, 64, 64)


def test_training_gradients_reach_only_the_decoders(tiny_model):
    m = tiny_model
    m.train()
    try:
        with torch.no_grad():
            emb, taps = m.encode(torch.randn(1, 3, 256, 256))
        pts = (torch.tensor([[[100.0, 120.0]]]), torch.ones(1, 1, dtype=torch.int))
        iou, logits = m.desam_forward(emb, taps, points=pts)
        (logits.mean() + iou.sum()).backward()
        assert all(p.grad is not None for p in m.pdmm.parameters())
        assert m.prim.iou_prediction_head.layers[0].weight.grad is not None
        assert all(p.grad is None for p in m.image_encoder.parameters())
    finally:
        m.zero_grad(set_to_none=True)
        m.eval()


def test_build_is_deterministic_in_structure_and_eval_mode(tiny_model):
    assert not tiny_model.training
    assert isinstance(tiny_model.pdmm.head, nn.Conv2d) and tiny_model.pdmm.head.bias is None


@pytest.mark.parametrize("h, w, H, W", [(256, 187, 150, 220), (171, 256, 512, 768), (256, 256, 2048, 2048)])
def test_postprocess_is_sams_two_interpolations(tiny_model, h, w, H, W):
    """F.interpolate to the encoder's input size, crop the unpadded part, F.interpolate to
    the slice, as segment_anything's Sam.postprocess_masks does."""
    import torch.nn.functional as F

    side = tiny_model.img_size
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 5
    ref = F.interpolate(x, (side, side), mode="bilinear", align_corners=False)[..., :h, :w]
    ref = F.interpolate(ref, (H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(tiny_model.postprocess_logits(x, (h, w), (H, W)), ref, rtol=0, atol=0)


def test_dense_pe_is_kept_per_weights_generation(tiny_model):
    pe = tiny_model.dense_pe()
    assert tiny_model.dense_pe() is pe
    torch.testing.assert_close(pe, tiny_model.prompt_encoder.get_dense_pe())
    generation = tiny_model.generation
    tiny_model.weights_changed()                 # what training code calls after an optimizer step
    assert tiny_model.generation != generation and tiny_model.dense_pe() is not pe
    pe = tiny_model.dense_pe()
    tiny_model.to("cpu")                         # to() makes new tensors: a new generation
    assert tiny_model.dense_pe() is not pe
    with torch.inference_mode():                 # asked for first under inference mode ...
        tiny_model.weights_changed()
        pe = tiny_model.dense_pe()
    assert not pe.is_inference()                 # ... it is still usable by training code
