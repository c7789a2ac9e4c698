"""Decoder-only fine-tuning (MedSAM-style): the first row of DB-SAM's ablation (issue #13).

SAM's mask decoder alone trains, on the frozen encoder's cached features
(``input_kind = "features"``: precomputed once, the encoder never runs in the loop), with
DB-SAM's prompts, loss and optimizer (``dbsam_family``: jittered ground-truth boxes,
the whole slice with an empty target on slices without the structure; Dice +
cross-entropy on the single mask; AdamW). ``prepare_model`` gives a DeSAM beside the
base with its own copy of SAM's mask decoder (encoder, prompt encoder, PRIM and PDMM
shared; the base's decoder is never changed); its encoder identity is the base's, so it
reads the base's cached features. ``predict``: the whole slice as the box (as
``DBSAMFamily.predict``); ``predict_box``: any box.

Files: the mask decoder's weights in the decoder container with format
``sam-mask-decoder`` (SAM's own mask decoder fine-tuned; the training record names the
family): not a DeSAM decoder, the service refuses it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.postprocess import remove_small_regions
from ..engine.predictor import SlicePredictor
from ..modeling.desam import DeSAM, ImageFeatures
from .dbsam_family import BOX_JITTER, box_prompts, freeze_unread_decoder_parts, jittered_box, whole_box
from .desam_family import DeSAMLoss, low_res_target, model_module
from .family import TrainItem
from .sam_decoder_family import MaskDecoderState

__all__ = ["DBSAMDecoderOnlyFamily", "DecoderBoxTrainingModule", "with_own_mask_decoder"]


def with_own_mask_decoder(base: DeSAM) -> DeSAM:
    """A DeSAM sharing ``base``'s parts except SAM's mask decoder, which is copied; same
    device, eval mode, encoder identity and frozen parts as the base."""
    model = DeSAM(encoder_name=base.encoder_name, image_encoder=base.image_encoder, prompt_encoder=base.prompt_encoder,
                  mask_decoder=copy.deepcopy(base.mask_decoder), prim=base.prim, pdmm=base.pdmm,
                  convention=base.convention, tap_indices=base.tap_indices).to(base.device)
    model.encoder_weights_sha256 = base.encoder_weights_sha256
    model.freeze_frozen_parts()
    return model.eval()


class DecoderBoxTrainingModule(nn.Module):
    """SAM's mask decoder registered (what trains); the rest of the model through a plain
    reference (frozen, never broadcast by DDP)."""

    def __init__(self, model: DeSAM) -> None:
        super().__init__()
        self.mask_decoder = model.mask_decoder
        self._model = (model,)

    @property
    def model(self) -> DeSAM:
        return self._model[0]

    def forward(self, embeddings: Sequence[torch.Tensor], boxes: torch.Tensor) -> torch.Tensor:
        """One 1 x 256 x E x E embedding per sample, boxes B x 4 in the input frame ->
        single-mask low-resolution logits B x 1 x 4E x 4E."""
        return torch.cat([self.model.sam_decode(e, points=None, boxes=boxes[n : n + 1], mask_input=None,
                                                multimask_output=False)[0] for n, e in enumerate(embeddings)])


class DBSAMDecoderOnlyFamily(MaskDecoderState):
    name = "dbsam_decoder_only"
    strategies = ("box",)
    input_kind = "features"

    def __init__(self, *, box_jitter: int = BOX_JITTER, loss: DeSAMLoss | None = None) -> None:
        self.box_jitter = int(box_jitter)
        self.loss_fn = loss or DeSAMLoss()

    def check_strategy(self, strategy: str) -> None:
        if strategy not in self.strategies:
            raise ValueError(f"the {self.name} family trains the 'box' strategy (jittered ground-truth boxes), "
                             f"not {strategy!r}")

    def prepare_model(self, model: DeSAM) -> DeSAM:
        return with_own_mask_decoder(model)

    def training_module(self, model: DeSAM, strategy: str) -> DecoderBoxTrainingModule:
        self.check_strategy(strategy)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.mask_decoder.parameters():
            p.requires_grad_(True)
        freeze_unread_decoder_parts(model.mask_decoder)
        model.mask_decoder.train()
        return DecoderBoxTrainingModule(model)

    def loss(self, module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_strategy(strategy)
        model = model_module(module).model
        device, img = model.device, model.img_size
        target = torch.stack([low_res_target(it.mask, it.features.input_size, img, device) for it in items])
        boxes = [jittered_box(it.mask, gen, jitter=self.box_jitter) for it, gen in zip(items, generators, strict=True)]
        box_t = box_prompts(boxes, [it.mask.shape for it in items], img, device)
        logits = module([it.features.embedding for it in items], box_t)
        return self.loss_fn(logits, target)

    def optimizer(self, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)

    def after_step(self, model: DeSAM) -> None:
        model.weights_changed()

    def predict_box(self, model: DeSAM, features: ImageFeatures, box: np.ndarray) -> np.ndarray:
        predictor = SlicePredictor(model, precision="fp32")
        predictor.set_features(features)
        masks, _, _ = predictor.predict(box=np.asarray(box, np.float64), multimask_output=False)
        return masks[0]

    def predict(self, model: DeSAM, features: ImageFeatures, strategy: str, options: dict[str, Any]) -> np.ndarray:
        self.check_strategy(strategy)
        mask = self.predict_box(model, features, whole_box(features.original_size))
        return remove_small_regions(mask, int(options.get("min_region_area", 64)))
