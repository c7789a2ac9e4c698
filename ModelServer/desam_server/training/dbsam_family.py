"""DB-SAM's training (issue #13): an image family (``input_kind = "image"``): every step
runs DB-SAM's encoder forward and backward through the frozen SAM encoder.

The model: ``modeling.dbsam_model.build_dbsam_model`` beside the freshly built DeSAM the
loop passes (its encoder and prompt encoder shared and frozen, its SAM mask decoder
copied, so the base never changes). Trainable: DB-SAM's encoder blocks and the mask
decoder's parts that the single-mask box output reads (its IoU head and the three other
masks' hypernetworks get no gradient from this loss and stay SAM's: so that DDP does not
wait for their gradients, as DeSAM's box strategy does with its IoU head).

Strategy ``box`` (the paper's, after MedSAM): the box around the slice's ground truth,
each side moved outwards by a random 0-20 pixels of a 1024 px frame (the longest side of
the slice as 1024: up to 20 px in a 1024 px SAM input, 5 px in LiteMedSAM's 256 px;
MedSAM's jitter) and clipped to the slice, drawn with the item's own generator. A slice
without the structure (only when the data has some: ``TrainingOptions.empty_ratio``; the
paper trains on slices with the structure only, ``empty_ratio=0``) gets the whole slice
as its box and an empty target (DeSAM's box prompt there). Measured consequence
(docs/DBSAM.md, evidence): the model then answers the whole-slice box with an empty mask
on every slice, so the whole-slice mode is no automatic setting for DB-SAM.

Loss: Dice + cross-entropy (MONAI's ``DiceCELoss`` through ``DeSAMLoss``, sigmoid,
per-sample Dice) on the single mask's low-resolution logits. Optimizer: AdamW
(weight decay 0.01, PyTorch's default; the paper gives AdamW, lr 1e-4, 12 epochs) with the
loop's polynomial learning rate. Activation checkpointing per stage: on for SAM's ViTs,
off for TinyViT by default (``build_dbsam_model``; docs/DBSAM.md measured both).

Prediction (validation, evaluation): prompt-free means a box that needs no ground truth;
``predict`` uses the whole slice as the box (as DeSAM's box mode: stateless, one pass per
slice, the same prompt DeSAM's whole-box decoder gets), holes and islands under
``min_region_area`` removed as there. ``predict_box`` answers any box (the ground-truth
box of the paper's evaluation, a propagation's neighbour box, a ROI); both go through
``engine.SlicePredictor`` as the service would (its "auto" encoder precision by
default), in eval mode.

Ablations (the paper's, in its direction): ``dbsam_adapters`` (channel attention
adapters only), ``dbsam_no_fusion`` (+ convolution branch and cross-attention), ``dbsam``
(+ fusion = the full model); decoder-only fine-tuning is ``dbsam_decoder_family``.
Files: ``modeling.dbsam_file`` (``dbsam-model``), served by ``engine.dbsam_serving``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.postprocess import remove_small_regions
from ..engine.predictor import SlicePredictor
from ..engine.preprocess import prepare_input, to_input_frame, to_rgb
from ..modeling.dbsam_encoder import dbsam_parts
from ..modeling.dbsam_file import dbsam_model_state_dict, load_dbsam_model, save_dbsam_model
from ..modeling.dbsam_model import DBSAM, build_dbsam_model
from ..modeling.desam import DeSAM
from .desam_family import DeSAMLoss, low_res_target, model_module
from .family import SliceImage, TrainItem

__all__ = ["DBSAMFamily", "DBSAMNoFusionFamily", "DBSAMAdaptersFamily", "DBSAMTrainingModule", "jittered_box",
           "whole_box", "truth_box", "box_prompts", "freeze_unread_decoder_parts", "BOX_JITTER"]

#: MedSAM's box jitter: up to 20 px per side in a 1024 px frame.
BOX_JITTER = 20


def whole_box(shape: tuple[int, int]) -> np.ndarray:
    """x0, y0, x1, y1 of the whole H x W slice."""
    h, w = shape
    return np.array([0.0, 0.0, float(w), float(h)])


def truth_box(mask: np.ndarray) -> np.ndarray:
    """x0, y0, x1, y1 (x1, y1 exclusive) of a non-empty mask's bounding box."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("an empty mask has no bounding box")
    return np.array([cols[0], rows[0], cols[-1] + 1.0, rows[-1] + 1.0])


def jittered_box(mask: np.ndarray, generator: torch.Generator, *, jitter: int = BOX_JITTER) -> np.ndarray:
    """The training box of one slice: ``truth_box`` with each side moved outwards by a
    random integer 0..jitter in a frame where the longest side is 1024, clipped to the
    slice; the whole slice when the mask is empty."""
    shifts = torch.randint(0, jitter + 1, (4,), generator=generator).numpy().astype(np.float64)
    h, w = mask.shape
    if not mask.any():
        return whole_box((h, w))
    shifts *= max(h, w) / 1024.0
    x0, y0, x1, y1 = truth_box(mask)
    return np.array([max(0.0, x0 - shifts[0]), max(0.0, y0 - shifts[1]), min(float(w), x1 + shifts[2]),
                     min(float(h), y1 + shifts[3])])


def box_prompts(boxes: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]], img_size: int, device,
                ) -> torch.Tensor:
    """Slice-frame boxes -> B x 4 in the input frame."""
    out = [to_input_frame(np.asarray(b, np.float64).reshape(2, 2), shape, img_size).reshape(4)
           for b, shape in zip(boxes, shapes, strict=True)]
    return torch.as_tensor(np.stack(out), dtype=torch.float32, device=device)


def freeze_unread_decoder_parts(mask_decoder: nn.Module) -> None:
    """SAM's mask decoder with one output mask (``multimask_output=False``) reads mask
    token 0's hypernetwork only, and its IoU head not at all: no gradient reaches them."""
    for module in (mask_decoder.iou_prediction_head, *mask_decoder.output_hypernetworks_mlps[1:]):
        for p in module.parameters():
            p.requires_grad_(False)


class DBSAMTrainingModule(nn.Module):
    """DB-SAM's trainable encoder parts and the model's SAM mask decoder registered (what
    trains); the model through a plain reference (its frozen parts are never broadcast)."""

    def __init__(self, model: DBSAM) -> None:
        super().__init__()
        self.encoder_parts = nn.ModuleDict(model.dbsam.trainable_modules())
        self.mask_decoder = model.mask_decoder
        self._model = (model,)

    @property
    def model(self) -> DBSAM:
        return self._model[0]

    def forward(self, x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """x: B x 3 x S x S encoder input; boxes: B x 4 in the input frame -> single-mask
        low-resolution logits B x 1 x 4E x 4E (SAM's decoder takes one image per call)."""
        embedding, _ = self.model.encode(x)
        logits = [self.model.sam_decode(embedding[n : n + 1], points=None, boxes=boxes[n : n + 1], mask_input=None,
                                        multimask_output=False)[0] for n in range(x.shape[0])]
        return torch.cat(logits)


class DBSAMFamily:
    """The full DB-SAM (``dbsam``); the ablations are subclasses that leave parts out."""

    name = "dbsam"
    strategies = ("box",)
    input_kind = "image"
    with_branch = True
    with_fusion = True

    def __init__(self, *, box_jitter: int = BOX_JITTER, checkpoint_stages: bool | None = None,
                 precision: str = "auto", loss: DeSAMLoss | None = None) -> None:
        """box_jitter: see ``jittered_box``; checkpoint_stages: None chooses by encoder
        (``build_dbsam_model``); precision: the encoder pass of ``predict`` and
        ``predict_box`` (``SlicePredictor``'s; "auto" encodes as the service does: bf16 on
        a GPU or a CPU with native bf16, else fp32; the decoder runs in fp32)."""
        self.box_jitter = int(box_jitter)
        self.checkpoint_stages = checkpoint_stages
        self.precision = precision
        self.loss_fn = loss or DeSAMLoss()

    def check_strategy(self, strategy: str) -> None:
        if strategy not in self.strategies:
            raise ValueError(f"the {self.name} family trains the 'box' strategy (jittered ground-truth boxes), "
                             f"not {strategy!r}")

    def check_model(self, model: nn.Module) -> DBSAM:
        if not isinstance(model, DBSAM):
            raise TypeError(f"the {self.name} family needs a DB-SAM model: pass the model through its "
                            "prepare_model first")
        want = dbsam_parts(with_branch=self.with_branch, with_fusion=self.with_fusion)
        if model.parts != want:
            raise ValueError(f"the {self.name} family trains the parts {', '.join(want)}; this model has "
                             f"{', '.join(model.parts)}")
        return model

    def prepare_model(self, model: DeSAM) -> DBSAM:
        """A DB-SAM model beside the base (``build_dbsam_model``); a DB-SAM model of this
        family is returned as it is."""
        if isinstance(model, DBSAM):
            return self.check_model(model)
        return build_dbsam_model(model, with_branch=self.with_branch, with_fusion=self.with_fusion,
                                 checkpoint_stages=self.checkpoint_stages)

    def training_module(self, model: DBSAM, strategy: str) -> DBSAMTrainingModule:
        self.check_strategy(strategy)
        self.check_model(model)
        model.freeze_frozen_parts()
        for p in model.trainable_parameters():
            p.requires_grad_(True)
        freeze_unread_decoder_parts(model.mask_decoder)
        model.train()
        return DBSAMTrainingModule(model)

    def loss(self, module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_strategy(strategy)
        model = model_module(module).model
        xs, targets, boxes, shapes = [], [], [], []
        for it, gen in zip(items, generators, strict=True):
            x, input_size = prepare_input(model, to_rgb(it.image.image, it.image.window))
            xs.append(x)
            targets.append(low_res_target(it.mask, input_size, model.img_size, model.device))
            boxes.append(jittered_box(it.mask, gen, jitter=self.box_jitter))
            shapes.append(it.mask.shape)
        logits = module(torch.cat(xs), box_prompts(boxes, shapes, model.img_size, model.device))
        return self.loss_fn(logits, torch.stack(targets))

    def optimizer(self, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)

    def after_step(self, model: DBSAM) -> None:
        model.weights_changed()

    def predict_box(self, model: DBSAM, source: SliceImage, box: np.ndarray) -> np.ndarray:
        """The model's mask for ``box`` (x0, y0, x1, y1 in slice pixels): bool H x W, through
        ``SlicePredictor`` in eval mode (the model's mode is restored)."""
        was_training = model.training
        model.eval()
        try:
            predictor = SlicePredictor(model, precision=self.precision)
            predictor.set_image(source.image, source.window)
            masks, _, _ = predictor.predict(box=np.asarray(box, np.float64), multimask_output=False)
        finally:
            model.train(was_training)
        return masks[0]

    def predict(self, model: DBSAM, source: SliceImage, strategy: str, options: dict[str, Any]) -> np.ndarray:
        """The whole slice as the box, small regions removed (see the module docstring)."""
        self.check_strategy(strategy)
        mask = self.predict_box(model, source, whole_box(source.image.shape[:2]))
        return remove_small_regions(mask, int(options.get("min_region_area", 64)))

    def trainable_state(self, model: DBSAM) -> dict[str, torch.Tensor]:
        return dbsam_model_state_dict(model)

    def load_trainable_state(self, model: DBSAM, state: dict[str, torch.Tensor]) -> None:
        for name, module in model.trainable_modules().items():
            prefix = name + "."
            module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                   strict=True)
        model.weights_changed()

    def save(self, model: DBSAM, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        self.check_model(model)
        return save_dbsam_model(model, path, structure=structure, training=training)

    def load(self, model: DBSAM, path: Path) -> dict[str, Any]:
        self.check_model(model)
        return load_dbsam_model(model, path)


class DBSAMNoFusionFamily(DBSAMFamily):
    """Ablation: adapters + convolution branch and cross-attention, no fusion."""

    name = "dbsam_no_fusion"
    with_fusion = False


class DBSAMAdaptersFamily(DBSAMFamily):
    """Ablation: the channel attention adapters alone (+ the mask decoder)."""

    name = "dbsam_adapters"
    with_branch = False
    with_fusion = False
