"""Shared by the decoder tests: a tiny DeSAM with trained-looking logits, an embedding."""

from __future__ import annotations

import torch

from desam_server.modeling import build_desam


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


def state_entries(state: dict, name: str) -> list[tuple]:
    """The (sources, versions, value) entries of one kind in a slice's decoder state:
    "two_way_first_block" (the first block's image side) or "projected_first_block" (the
    bare tokens through the first upscaling layer)."""
    return [entry for key, entry in state.items() if key[0] == name]
