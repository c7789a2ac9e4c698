"""Shared by the tests of served DB-SAM / SAM-Mix models: a stand-in slice classifier with
a known class activation map, and adapted models built with ``adapted_sam`` (a perturbed
copy of the base's encoder and mask decoder) as the service's ``LoadedDecoder``."""

from __future__ import annotations

import copy

import torch

from desam_server.api.decoders import LoadedDecoder
from desam_server.engine.adapted_sam import adapted_sam
from desam_server.modeling.cam import class_activation_map
from desam_server.modeling.slice_classifier import ClassifierOutput


class TwoBlobClassifier(torch.nn.Module):
    """A stand-in slice classifier with a known map on a 64 x 80 slice (8 x 10 cells of 8
    pixels): blob A on rows 1-2, columns 1-3 and a smaller blob B on rows 5-6, columns 7-8;
    presence logit ``logit``."""

    in_chans = 1

    def __init__(self, logit: float = 5.0) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x):
        features = torch.zeros(x.shape[0], 1, 8, 10)
        features[:, 0, 1:3, 1:4] = 1.0
        features[:, 0, 5:7, 7:9] = 1.0
        return ClassifierOutput(logits=torch.full((x.shape[0],), self.logit), features=features)

    def class_activation_map(self, features, *, size=None):
        return class_activation_map(features, torch.ones(1), size=size)


BLOB_A, BLOB_B = (8.0, 8.0, 32.0, 24.0), (56.0, 40.0, 72.0, 56.0)


def adapted(base, family: str, sha: str, *, name: str, classifier=None) -> LoadedDecoder:
    """A ``family`` model named ``name`` beside ``base`` whose adapted encoder's identity
    hash is ``sha`` (its first byte seeds the perturbation)."""
    encoder, decoder = copy.deepcopy(base.image_encoder), copy.deepcopy(base.mask_decoder)
    gen = torch.Generator().manual_seed(int(sha[:2], 16))
    with torch.no_grad():
        for p in [*encoder.neck.parameters(), *decoder.output_upscaling.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model = adapted_sam(base, image_encoder=encoder, mask_decoder=decoder, encoder_name=f"tiny+{family}",
                        encoder_weights_sha256=sha)
    return LoadedDecoder(name, model, {"structure": name, "encoder": "tiny"}, "0" * 64, family=family,
                         classifier=classifier)
