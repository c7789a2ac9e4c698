"""The fast path on a decoder whose norms and upscaling biases are not the identity init
(trained weights are not): the matrix upscaling (``decoder_upscale``) and the whole click,
with and without the slice's cache, equal segment_anything's modules."""

from __future__ import annotations

import copy

import pytest
import torch
from segment_anything.modeling import MaskDecoder, TwoWayTransformer

from desam_server.modeling.decoder_fast import MaskDense, mask_decoder_forward
from desam_server.modeling.decoder_state import TransformerSliceCache
from desam_server.modeling.decoder_upscale import upscaled_masks

from decoder_helpers import embedding, sam_constants, tiny_model


def randomise_norms(decoder: MaskDecoder, seed: int) -> MaskDecoder:
    """A copy whose layer norms and first upscaling bias are not the identity init (with
    weight 1 and bias 0 the per-column factors of the unrolling would go untested)."""
    decoder = copy.deepcopy(decoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in decoder.transformer.layers:
            layer.norm4.weight.copy_(0.5 + torch.rand(layer.norm4.weight.shape, generator=g))
            layer.norm4.bias.copy_(0.3 * torch.randn(layer.norm4.bias.shape, generator=g))
        decoder.output_upscaling[0].bias.copy_(0.2 * torch.randn(decoder.output_upscaling[0].bias.shape, generator=g))
        for mlp in decoder.output_hypernetworks_mlps:  # trained-looking logits (tens)
            mlp.layers[-1].weight.mul_(40)
    return decoder


@pytest.fixture(scope="module")
def model():
    return tiny_model(6)


@pytest.fixture(scope="module")
def decoder(model):
    return randomise_norms(model.mask_decoder, 1)


@pytest.fixture(scope="module")
def image(model):
    return embedding(model, 2)


def prompt(model, kind: str, batch: int = 1):
    g = torch.Generator().manual_seed(3)
    side = model.img_size
    pts = (torch.rand(batch, 2, 2, generator=g) * side, torch.tensor([[1, 0]]).repeat(batch, 1))
    box = torch.tensor([[8.0, 16.0, side - 20.0, side - 9.0]]).repeat(batch, 1)
    low_res = 4 * model.prompt_encoder.image_embedding_size[0]
    mask = torch.randn(batch, 1, low_res, low_res, generator=g) * 4
    with torch.no_grad():
        sparse, dense = model.prompt_encoder(points=pts if "points" in kind else None,
                                             boxes=box if "box" in kind else None, masks=None)
        if "mask" in kind:
            return sparse, MaskDense.of(model.prompt_encoder.mask_downscaling, mask), \
                model.prompt_encoder.mask_downscaling(mask)
    return sparse, dense, dense


@pytest.mark.parametrize("rows", [256, 100, 64, 1])
@pytest.mark.parametrize("trained_look", [True, False])
def test_the_upscaling_as_matrix_products_equals_the_modules(model, decoder, rows, trained_look):
    """Chunks of input pixels (a clicked slice has 4,096; the tiny model 256) give the
    modules' upscaling and hypernetwork product for every chunk size, with the default
    norms and with norms and biases as trained weights have them."""
    decoder = decoder if trained_look else model.mask_decoder
    _, projection = sam_constants(model, decoder)
    e = model.prompt_encoder.image_embedding_size[0]
    g = torch.Generator().manual_seed(4)
    keys, hyper = torch.randn(2, e * e, 256, generator=g), torch.randn(2, 3, 32, generator=g) * 40
    with torch.no_grad():
        up = decoder.output_upscaling(keys.transpose(1, 2).reshape(2, 256, e, e))
        want = (hyper @ up.flatten(2)).view(2, 3, 4 * e, 4 * e)
        got = upscaled_masks(decoder, projection, keys, hyper, e, rows)
    assert want.abs().max() > 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["points", "box", "points+mask"])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("matrix_upscaling", [True, False])
def test_a_click_with_state_equals_the_module(model, decoder, image, kind, multimask, matrix_upscaling):
    sparse, dense, full = prompt(model, kind)
    pe, cache = model.dense_pe(), TransformerSliceCache()
    constants, projection = sam_constants(model, decoder)
    with torch.inference_mode():
        want = decoder(image, pe, sparse, full, multimask)
        for _ in range(2):  # the first call fills the cache, the second reads it
            got = mask_decoder_forward(decoder, constants, projection, image, sparse, dense, multimask, cache=cache,
                                       matrix_upscaling=matrix_upscaling)
            assert want[0].abs().max() > 1
            torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-5)


def test_a_deeper_transformer_is_reassociated_block_by_block(model, image):
    """The fast path runs over any number of blocks (SAM has two)."""
    torch.manual_seed(8)
    deep = MaskDecoder(transformer_dim=256, transformer=TwoWayTransformer(depth=3, embedding_dim=256, mlp_dim=512,
                                                                          num_heads=8))
    deep = randomise_norms(deep, 2)
    sparse, dense, _ = prompt(model, "points")
    pe, cache = model.dense_pe(), TransformerSliceCache()
    constants, projection = sam_constants(model, deep)
    with torch.inference_mode():
        want = deep(image, pe, sparse, dense, True)
        got = mask_decoder_forward(deep, constants, projection, image, sparse, dense, True, cache=cache)
    assert cache.first_block is not None and len(constants.blocks) == 3
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)


def test_a_batch_of_prompts_shares_the_first_block(model, decoder, image):
    sparse, dense, _ = prompt(model, "points", batch=3)
    pe, cache = model.dense_pe(), TransformerSliceCache()
    constants, projection = sam_constants(model, decoder)
    with torch.inference_mode():
        got = mask_decoder_forward(decoder, constants, projection, image, sparse, dense, True, cache=cache)
        want = decoder(image, pe, sparse, dense, True)
    assert cache.first_block is not None
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-3)


def test_the_upscaling_matrices_follow_a_weight_change(model, image):
    """New norms and upscaling weights (a decoder change, then ``weights_changed``): the
    model's matrices and the slice's state are rebuilt, the answer follows."""
    from desam_server.modeling import FastPath, SliceDecoderState

    changed = copy.deepcopy(model)
    changed.mask_decoder = randomise_norms(model.mask_decoder, 3)
    changed.weights_changed()
    decoder = changed.mask_decoder
    state = SliceDecoderState()
    args = dict(points=(torch.tensor([[[20.0, 30.0]]]), torch.tensor([[1]])), boxes=None, mask_input=None,
                multimask_output=False)
    with torch.no_grad():
        changed.sam_decode(image, fast=FastPath(), state=state, **args)
        for change in (lambda: decoder.transformer.layers[0].norm4.weight.mul_(1.3),
                       lambda: decoder.transformer.layers[1].norm4.bias.add_(0.2),
                       lambda: decoder.output_upscaling[0].weight.mul_(0.7)):
            before = state.sam.first_block
            change()
            changed.weights_changed()
            got = changed.sam_decode(image, fast=FastPath(), state=state, **args)[0]
            torch.testing.assert_close(got, changed.sam_decode(image, **args)[0], rtol=1e-4, atol=1e-3)
            assert state.sam.first_block is not before
