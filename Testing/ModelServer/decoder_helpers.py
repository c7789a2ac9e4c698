"""Shared by the decoder tests: a tiny DeSAM with trained-looking logits, an embedding."""

from __future__ import annotations

import torch

from desam_server.modeling import build_desam
from desam_server.modeling.decoder_fast import transformer_constants
from desam_server.modeling.decoder_upscale import upscale_projection


def tiny_model(seed: int):
    """A tiny DeSAM. Random SAM weights give logits below 1; the hypernetworks are scaled
    to trained-looking logits (tens) so that the tests' tolerances mean something."""
    torch.manual_seed(seed)
    m = build_desam("tiny")
    with torch.no_grad():
        for mlp in m.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(40)
    return m


def embedding(model, seed: int) -> torch.Tensor:
    """A random 1 x 256 x E x E image embedding for ``model``."""
    e = model.prompt_encoder.image_embedding_size[0]
    return torch.randn(1, 256, e, e, generator=torch.Generator().manual_seed(seed))


def sam_constants(model, decoder=None):
    """(TransformerConstants, UpscaleProjection) of SAM's decoder (or ``decoder``) for the
    model's positional encoding: what ``DeSAM`` derives and passes to ``decoder_fast``."""
    decoder = decoder or model.mask_decoder
    with torch.no_grad():
        return transformer_constants(decoder.transformer, model.dense_pe()), upscale_projection(decoder)
