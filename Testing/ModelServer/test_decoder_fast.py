"""decoder_fast: the reassociated inference forward equals segment_anything's modules."""

from __future__ import annotations

import pytest
import torch

from desam_server.modeling import FastPath, SliceDecoderState
from desam_server.modeling.decoder_fast import mask_decoder_forward, transformer_constants, two_way_forward
from desam_server.modeling.decoder_state import TransformerSliceCache

from decoder_helpers import embedding, sam_constants, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(3)


@pytest.fixture(scope="module")
def image(model):
    return embedding(model, 0)


def prompts(model, kind: str, batch: int = 1):
    g = torch.Generator().manual_seed(batch)
    side = model.img_size
    points = (torch.rand(batch, 3, 2, generator=g) * side, torch.tensor([[1, 0, 1]]).repeat(batch, 1))
    box = torch.tensor([[10.0, 20.0, side - 30.0, side - 5.0]]).repeat(batch, 1)
    low_res = [4 * s for s in model.prompt_encoder.image_embedding_size]
    mask = torch.randn(batch, 1, *low_res, generator=g) * 4
    args = {"points": dict(points=points, boxes=None, masks=None),
            "box": dict(points=None, boxes=box, masks=None),
            "points+box": dict(points=points, boxes=box, masks=None),
            "points+mask": dict(points=points, boxes=None, masks=mask)}[kind]
    return model.prompt_encoder(**args)


@pytest.mark.parametrize("kind", ["points", "box", "points+box", "points+mask"])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_mask_decoder_forward_equals_the_module(model, image, kind, multimask, batch):
    sparse, dense = prompts(model, kind, batch)
    pe = model.dense_pe()
    constants, projection = sam_constants(model)
    with torch.inference_mode():
        want_masks, want_iou = model.mask_decoder(image, pe, sparse, dense, multimask)
        got_masks, got_iou = mask_decoder_forward(model.mask_decoder, constants, projection, image, sparse, dense,
                                                  multimask)
    assert got_masks.shape == want_masks.shape == (batch, 3 if multimask else 1, 64, 64)
    assert want_masks.abs().max() > 1  # not a comparison of near-zero numbers
    torch.testing.assert_close(got_masks, want_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_iou, want_iou, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_two_way_forward_equals_the_module_for_shared_and_per_prompt_images(model, image, shared):
    sparse, dense = prompts(model, "points", 4)
    decoder = model.mask_decoder
    tokens = torch.cat([torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])[None].expand(4, -1, -1),
                        sparse], dim=1)
    images = image if shared else image + 0.1 * torch.randn(4, *image.shape[1:])
    pe = model.dense_pe()
    constants, _ = sam_constants(model)
    with torch.no_grad():
        want_q, want_k = decoder.transformer(images.expand(4, -1, -1, -1) + dense, pe, tokens)
        got_q, got_k = two_way_forward(decoder.transformer, constants, images, tokens, dense)
    torch.testing.assert_close(got_q, want_q, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-4, atol=1e-5)


def test_prim_infer_equals_its_forward_and_training_uses_the_forward(model, image):
    sparse, dense = prompts(model, "points", 5)
    pe = model.dense_pe()
    constants = transformer_constants(model.prim.transformer, pe)
    with torch.no_grad():
        fast = model.prim.infer(image, sparse, dense, constants=constants)
        slow = model.prim(image, pe, sparse, dense)
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Training: the module's forward, gradients reach PRIM's weights.
    iou, mask_embedding = model.prim(image, pe, sparse, dense)
    (iou.sum() + mask_embedding.mean()).backward()
    grad = model.prim.transformer.layers[0].cross_attn_image_to_token.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.prim.zero_grad(set_to_none=True)


def test_state_computes_the_first_block_once_per_slice(model, image):
    """Later prompts on a slice reuse the first block's image side from the slice's
    cache; the answers still equal the module's for every prompt."""
    pe, decoder, cache = model.dense_pe(), model.mask_decoder, TransformerSliceCache()
    constants, projection = sam_constants(model)
    kept = None
    for kind in ("points", "box", "points+box"):
        sparse, dense = prompts(model, kind)
        with torch.inference_mode():
            got = mask_decoder_forward(decoder, constants, projection, image, sparse, dense, True, cache=cache)
            want = decoder(image, pe, sparse, dense, True)
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
        assert cache.first_block is not None
        kept = kept or cache.first_block
        assert cache.first_block is kept  # computed by the first prompt


def test_a_slice_state_follows_the_weights_generation(model, image):
    """``DeSAM`` clears a slice's state filled under other weights (``weights_changed``)
    instead of reading it: after a change the answer is the new weights' answer."""
    state = SliceDecoderState()
    sparse_args = dict(points=(torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])), boxes=None, mask_input=None,
                       multimask_output=False)
    v_bias = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image.v_proj.bias
    with torch.no_grad():
        model.sam_decode(image, fast=FastPath(), state=state, **sparse_args)
        before, generation = state.sam.first_block, state.generation
        v_bias.add_(0.25)
        model.weights_changed()
        try:
            got = model.sam_decode(image, fast=FastPath(), state=state, **sparse_args)[0]
            want = model.sam_decode(image, **sparse_args)[0]
        finally:
            v_bias.sub_(0.25)
            model.weights_changed()
    assert state.generation != generation and state.sam.first_block is not before
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_dense_tensor_that_varies_over_the_image_skips_the_state(model, image):
    """A mask input given as its full dense embedding (not factored): no shared first block."""
    pe, decoder = model.dense_pe(), model.mask_decoder
    constants, projection = sam_constants(model)
    sparse, dense = prompts(model, "points+mask")
    fresh = TransformerSliceCache()
    with torch.no_grad():
        got = mask_decoder_forward(decoder, constants, projection, image, sparse, dense, False, cache=fresh)[0]
        want = decoder(image, pe, sparse, dense, False)[0]
    assert fresh.first_block is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_prompts_with_different_constant_rows_share_the_state(model, image):
    """Each prompt's constant dense row joins the shared first block through small products."""
    pe, decoder, cache = model.dense_pe(), model.mask_decoder, TransformerSliceCache()
    constants, projection = sam_constants(model)
    sparse, _ = prompts(model, "points", 3)
    e = image.shape[-1]
    dense = torch.randn(3, 256, 1, 1, generator=torch.Generator().manual_seed(5)).expand(-1, -1, e, e)
    with torch.no_grad():
        got = mask_decoder_forward(decoder, constants, projection, image, sparse, dense, True, cache=cache)
        want = decoder(image, pe, sparse, dense, True)
    assert cache.first_block is not None
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_prim_with_state_scores_a_batch_of_prompts_like_the_module(model, image):
    """Grid mode: many prompts against one slice's state, in batches and one by one."""
    state = SliceDecoderState()
    sparse, dense = prompts(model, "points", 6)
    with torch.no_grad():
        batched = model.run_prim(image, sparse, dense, fast=FastPath(), state=state)
        first = state.prim.first_block
        single = [model.run_prim(image, sparse[i : i + 1], dense[i : i + 1], fast=FastPath(), state=state)
                  for i in range(6)]
        want = model.run_prim(image, sparse, dense)  # fast=None: PRIM's module forward
    assert first is not None and state.prim.first_block is first
    for got in (batched, tuple(torch.cat(parts) for parts in zip(*single, strict=True))):
        torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)
