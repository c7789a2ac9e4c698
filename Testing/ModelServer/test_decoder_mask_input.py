"""Refinement clicks: a mask input's dense embedding, kept factored (``MaskDense``), joins
the slice's cached first block; answers equal segment_anything's modules."""

from __future__ import annotations

import pytest
import torch

from desam_server.modeling import FastPath, SliceDecoderState
from desam_server.modeling.decoder_fast import MaskDense, mask_decoder_forward
from desam_server.modeling.decoder_state import TransformerSliceCache

from decoder_helpers import embedding, sam_constants, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(4)


@pytest.fixture(scope="module")
def image(model):
    return embedding(model, 1)


def masks(model, batch: int = 1, seed: int = 0) -> torch.Tensor:
    side = 4 * model.prompt_encoder.image_embedding_size[0]
    return torch.randn(batch, 1, side, side, generator=torch.Generator().manual_seed(seed)) * 4


def points(model, batch: int = 1):
    g = torch.Generator().manual_seed(7)
    return torch.rand(batch, 2, 2, generator=g) * model.img_size, torch.tensor([[1, 0]]).repeat(batch, 1)


def unexpected(self):
    raise AssertionError("the mask input's dense embedding was materialised")


def assert_same(got, want):
    assert want[0].abs().max() > 1  # not a comparison of near-zero numbers
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_mask_dense_factors_the_prompt_encoders_mask_embedding(model):
    m = masks(model, 2)
    factored = MaskDense.of(model.prompt_encoder.mask_downscaling, m)
    assert factored.hidden.shape[1] == factored.weight.shape[1] == 16
    with torch.no_grad():
        torch.testing.assert_close(factored.full(), model.prompt_encoder.mask_downscaling(m), rtol=1e-5, atol=1e-5)
    # Another structure (last layer not a 1 x 1 convolution): no factoring.
    other = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 2, 2), torch.nn.Conv2d(4, 256, 3, padding=1))
    assert MaskDense.of(other, m) is None


@pytest.mark.parametrize("first_prompt_has_a_mask", [False, True])
def test_refinement_reuses_the_slices_first_block(model, image, first_prompt_has_a_mask, monkeypatch):
    monkeypatch.setattr(MaskDense, "full", unexpected)  # the factored path, never the full embedding
    pe, decoder, cache = model.dense_pe(), model.mask_decoder, TransformerSliceCache()
    constants, projection = sam_constants(model)
    pts = points(model)
    sparse, plain_dense = model.prompt_encoder(points=pts, boxes=None, masks=None)
    order = [1, None, 2] if first_prompt_has_a_mask else [None, 1, 2]
    kept = None
    for seed in order:
        with torch.inference_mode():
            if seed is None:
                dense, want_dense = plain_dense, plain_dense
            else:
                m = masks(model, seed=seed)
                dense = MaskDense.of(model.prompt_encoder.mask_downscaling, m)
                want_dense = model.prompt_encoder.mask_downscaling(m)
            got = mask_decoder_forward(decoder, constants, projection, image, sparse, dense, True, cache=cache)
            want = decoder(image, pe, sparse, want_dense, True)
        assert_same(got, want)
        kept = kept or cache.first_block
        assert cache.first_block is kept  # one per slice, whatever the prompts


def test_batched_mask_inputs_fall_back_to_the_full_embedding(model, image):
    pe, decoder, cache = model.dense_pe(), model.mask_decoder, TransformerSliceCache()
    constants, projection = sam_constants(model)
    sparse, _ = model.prompt_encoder(points=points(model, 3), boxes=None, masks=None)
    m = masks(model, 3)
    with torch.inference_mode():
        got = mask_decoder_forward(decoder, constants, projection, image, sparse,
                                   MaskDense.of(model.prompt_encoder.mask_downscaling, m), False, cache=cache)
        want = decoder(image, pe, sparse, model.prompt_encoder.mask_downscaling(m), False)
    assert cache.first_block is None
    assert_same(got, want)


@pytest.mark.parametrize("with_points", [True, False])
def test_sam_decode_with_a_mask_input_equals_the_module_path(model, image, with_points, monkeypatch):
    """``DeSAM.sam_decode`` factors the mask input when given a slice state; the module
    forward (``fast=None``) is the reference."""
    monkeypatch.setattr(MaskDense, "full", unexpected)
    kwargs = dict(points=points(model) if with_points else None, boxes=None, mask_input=masks(model, seed=3),
                  multimask_output=True)
    state = SliceDecoderState()
    with torch.inference_mode():
        model.sam_decode(image, points=points(model), boxes=None, mask_input=None, multimask_output=True,
                         fast=FastPath(), state=state)
        first = state.sam.first_block
        got = model.sam_decode(image, fast=FastPath(), state=state, **kwargs)
        monkeypatch.undo()  # the module path builds the full embedding, as SAM does
        want = model.sam_decode(image, **kwargs)
    assert first is not None and state.sam.first_block is first
    assert_same(got, want)
