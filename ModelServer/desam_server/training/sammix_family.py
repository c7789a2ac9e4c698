"""SAM-Mix's training family (``sammix``): the slice classifier, the encoder's LoRA
adapters and SAM's mask decoder trained jointly (multitask), as in Ward and Imran.

- Input kind ``image``: every step runs the classifier on every item (a slice with a
  presence label; focal loss) and the LoRA-adapted encoder + mask decoder on the items
  that are segmented and hold the structure (Dice loss), prompted with a box.
- Strategies = the segmenter's box source: ``gt_box`` (the box of the slice's label,
  each side moved by up to ``box_jitter`` of the box's size, seeded per sample, so that
  SAM learns from boxes as loose as CAM boxes) or ``cam_box`` (the classifier's current
  CAM box of the slice, largest region at ``omega``; the jittered label box when the map
  gives none). "Label boxes first, CAM boxes later" is not offered: the family's loss is
  not told the epoch, and counting steps in the family would not survive resuming.
- Batch norm: the classifier trains in train mode (batch statistics over the step's
  slices, running statistics updated); ``predict`` switches the model to eval mode (the
  running statistics) for the slice and back to the mode it found.
- ``predict`` (validation, evaluation) is the product's inference, ``SamMix.predict_slice``:
  classify -> CAM box -> SAM with the LoRA encoder; a slice called absent is empty, so
  validation Dice on whole slabs counts the empty slices.
- Optimizer: AdamW (our choice; the paper's is not known here), the classifier at
  ``classifier_lr_scale`` x the run's learning rate (it starts from random weights; the
  decoder and adapters fine-tune pretrained SAM).
- Data: ``prepare_data`` builds ``sammix_data.SamMixTrainingData`` from ``SamMixCase``
  cases (``run_training`` calls it); ``TrainingOptions.empty_ratio`` does not apply (every
  labelled slice trains the classifier).
- Files: ``engine.sammix_file`` (format ``sam-mix``); serving: ``engine.sammix_serving``.
- One process only: a batch without a segmented slice leaves the adapters and the decoder
  without gradients, which DDP would wait for.

Options (``TrainConfig.family_options``): ``SamMixSettings``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.preprocess import prepare_input, to_input_frame, to_rgb
from ..engine.sammix import SamMix, build_sammix
from ..engine.sammix_file import load_sammix_into, sammix_tensors, save_sammix
from ..modeling.cam import cam_boxes
from ..modeling.lora import lora_modules
from ..modeling.sammix_loss import SamMixLoss
from ..modeling.slice_classifier import DILATIONS, RESNETS
from .desam_family import low_res_target
from .family import SliceImage, TrainItem, option_names
from .sammix_data import SamMixTrainingData, build_sammix_data

__all__ = ["SamMixFamily", "SamMixSettings", "SamMixTrainingModule", "label_box", "STRATEGIES"]

STRATEGIES = ("gt_box", "cam_box")


_KIND_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false"}


@dataclass(frozen=True)
class SamMixSettings:
    """classifier_depth / classifier_output_stride: ``SliceClassifier`` (ResNet-50 at
    stride 8 by default; 18 or 34 for small budgets); rank / lora_alpha: the adapters
    (rank 8 the paper's); focal_alpha, focal_gamma, focal_weight, dice_weight: the loss
    (``SamMixLoss``); classifier_lr_scale, weight_decay: the optimizer; box_jitter: see
    ``label_box``; segmented_repeat: how often each segmented slice holding the structure
    appears per epoch (``sammix_data``); bn_momentum: the classifier's batch-norm momentum
    for its running statistics (torch's 0.1; higher for short runs, whose running
    statistics would otherwise still lean on their start); threshold, omega, largest_only: inference
    (``SamMix.predict_slice``), written into the trained file."""

    classifier_depth: int = 50
    classifier_output_stride: int | None = None
    rank: int = 8
    lora_alpha: float | None = None
    focal_alpha: float | None = 0.25
    focal_gamma: float = 2.0
    focal_weight: float = 1.0
    dice_weight: float = 1.0
    classifier_lr_scale: float = 10.0
    weight_decay: float = 0.01
    box_jitter: float = 0.1
    segmented_repeat: int = 1
    bn_momentum: float = 0.1
    threshold: float = 0.5
    omega: float = 0.5
    largest_only: bool = True

    def __post_init__(self) -> None:
        for f in fields(self):                   # options arrive as JSON: check each one's type first
            value, kind = getattr(self, f.name), f.type.split(" | ")[0]
            if value is None and f.type.endswith("| None"):
                continue
            if kind == "bool":
                right = isinstance(value, bool)
            else:
                right = isinstance(value, int if kind == "int" else (int, float)) and not isinstance(value, bool)
            if not right:
                raise ValueError(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r}")
        if self.classifier_depth not in RESNETS:
            raise ValueError(f"classifier_depth must be one of {sorted(RESNETS)}, got {self.classifier_depth}")
        stride = self.classifier_output_stride
        if stride is not None and (stride not in DILATIONS or (self.classifier_depth < 50 and stride != 32)):
            raise ValueError(f"classifier_output_stride {stride} is not one of ResNet-{self.classifier_depth}'s "
                             "(18, 34: 32; 50, 101: 8, 16 or 32)")
        if self.rank < 1 or (self.lora_alpha is not None and not self.lora_alpha > 0):
            raise ValueError("rank must be at least 1 and lora_alpha positive")
        if self.focal_gamma < 0 or self.focal_weight < 0 or self.dice_weight < 0 or not (
                self.focal_alpha is None or 0.0 <= self.focal_alpha <= 1.0):
            raise ValueError("focal_gamma and the loss weights must be >= 0, focal_alpha in [0, 1]")
        if not 0.0 <= self.box_jitter < 0.5:
            raise ValueError(f"box_jitter must be in [0, 0.5), got {self.box_jitter}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 < self.omega <= 1.0:
            raise ValueError(f"omega must be in (0, 1], got {self.omega}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if not self.classifier_lr_scale > 0 or self.weight_decay < 0:
            raise ValueError("classifier_lr_scale must be positive and weight_decay >= 0")
        if isinstance(self.segmented_repeat, bool) or not isinstance(self.segmented_repeat, int) \
                or self.segmented_repeat < 1:
            raise ValueError(f"segmented_repeat must be a positive integer, got {self.segmented_repeat!r}")

    def inference(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "omega": self.omega, "largest_only": self.largest_only}


def label_box(mask: np.ndarray, jitter: float, generator: torch.Generator) -> tuple[float, float, float, float]:
    """The box of a non-empty label (x0, y0, x1, y1, slice pixels, x1 / y1 exclusive), each
    side moved by a uniform amount in [-jitter, jitter] x the box's width (x) or height (y),
    clipped to the slice and kept at least one pixel wide."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        raise ValueError("a label box needs a non-empty mask")
    h, w = mask.shape
    x0, y0, x1, y1 = float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
    if jitter > 0:
        u = (torch.rand(4, generator=generator, dtype=torch.float64).numpy() * 2 - 1) * jitter
        bw, bh = x1 - x0, y1 - y0
        x0, y0, x1, y1 = x0 + u[0] * bw, y0 + u[1] * bh, x1 + u[2] * bw, y1 + u[3] * bh
    x0, x1 = min(max(x0, 0.0), w - 1.0), min(max(x1, 1.0), float(w))
    y0, y1 = min(max(y0, 0.0), h - 1.0), min(max(y1, 1.0), float(h))
    return x0, y0, max(x1, x0 + 1.0), max(y1, y0 + 1.0)


class SamMixTrainingModule(nn.Module):
    """Registers exactly what trains: the classifier, the LoRA adapters (A and B of each
    target, by index) and the mask decoder; the SamMix is reached through ``model``."""

    def __init__(self, model: SamMix) -> None:
        super().__init__()
        self.classifier = model.classifier
        self.adapters = nn.ModuleList(nn.ModuleList([m.lora_a, m.lora_b])
                                      for m in lora_modules(model.image_encoder).values())
        self.mask_decoder = model.mask_decoder
        self._model = (model,)

    @property
    def model(self) -> SamMix:
        return self._model[0]


class SamMixFamily:
    name = "sammix"
    strategies = STRATEGIES
    input_kind = "image"

    def __init__(self, **options: Any) -> None:
        known = {f.name for f in fields(SamMixSettings)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown sammix options: {option_names(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        self.settings = SamMixSettings(**options)
        s = self.settings
        self.loss_fn = SamMixLoss(focal_weight=s.focal_weight, dice_weight=s.dice_weight, alpha=s.focal_alpha,
                                  gamma=s.focal_gamma)
        self._classifier_params: set[int] = set()

    def check_strategy(self, strategy: str) -> None:
        if strategy not in self.strategies:
            raise ValueError(f"unknown strategy {strategy!r}; the sammix family's box sources are "
                             f"{' or '.join(repr(s) for s in self.strategies)}")

    # ---- model and data --------------------------------------------------------------------
    def prepare_model(self, model) -> SamMix:
        """A SamMix built from the DeSAM ``model`` (copies; ``model`` unchanged) with this
        family's classifier and adapters; a SamMix is returned as it is."""
        if isinstance(model, SamMix):
            return model
        s = self.settings
        sammix = build_sammix(model, classifier_depth=s.classifier_depth,
                              classifier_output_stride=s.classifier_output_stride, rank=s.rank,
                              lora_alpha=s.lora_alpha)
        for module in sammix.classifier.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = s.bn_momentum
        return sammix

    def prepare_data(self, cases, options) -> SamMixTrainingData:
        """``run_training``'s data for this family (``sammix_data.build_sammix_data``)."""
        return build_sammix_data(cases, axis=options.axis, validation_fraction=options.validation_fraction,
                                 slabs=options.slabs, gap=options.gap, seed=options.config.seed,
                                 slice_step=options.slice_step, segmented_repeat=self.settings.segmented_repeat,
                                 augmentations=options.augmentations)

    def training_module(self, model: SamMix, strategy: str) -> SamMixTrainingModule:
        self.check_strategy(strategy)
        if not isinstance(model, SamMix):
            raise TypeError("the sammix family trains a SamMix: pass the model through prepare_model first")
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ValueError("the sammix family trains in one process (see sammix_family's module docstring)")
        model.set_trainable()
        model.train()
        self._classifier_params = {id(p) for p in model.classifier.parameters()}
        return SamMixTrainingModule(model)

    def optimizer(self, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        classifier = [p for p in parameters if id(p) in self._classifier_params]
        others = [p for p in parameters if id(p) not in self._classifier_params]
        groups = [g for g in ({"params": classifier, "lr": learning_rate * self.settings.classifier_lr_scale},
                              {"params": others, "lr": learning_rate}) if g["params"]]
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=self.settings.weight_decay)

    def after_step(self, model: SamMix) -> None:
        """Nothing is derived from the weights."""

    # ---- the loss ----------------------------------------------------------------------------
    def _classify(self, model: SamMix, grays: list[np.ndarray]):
        """The classifier on every slice (one pass per slice size): (logits B, features per slice)."""
        logits: list[torch.Tensor | None] = [None] * len(grays)
        features: list[torch.Tensor | None] = [None] * len(grays)
        groups: dict[tuple[int, int], list[int]] = {}
        for n, g in enumerate(grays):
            groups.setdefault(g.shape, []).append(n)
        for idx in groups.values():
            x = torch.as_tensor(np.stack([grays[n] for n in idx]), device=model.device).float()[:, None] / 255.0
            out = model.classifier(x)
            for j, n in enumerate(idx):
                logits[n], features[n] = out.logits[j], out.features[j]
        return torch.stack(logits), features

    def _box(self, model: SamMix, item: TrainItem, feature: torch.Tensor, strategy: str,
             generator: torch.Generator) -> tuple[tuple[float, float, float, float], bool]:
        if strategy == "cam_box":
            cam = model.classifier.class_activation_map(feature.detach()[None].float(), size=item.mask.shape)[0]
            regions = cam_boxes(cam, self.settings.omega, largest_only=True)
            if regions:
                return tuple(float(v) for v in regions[0].xyxy()), True
        return label_box(item.mask, self.settings.box_jitter, generator), False

    def loss(self, module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_strategy(strategy)
        model = (module.module if hasattr(module, "module") else module).model
        device, img = model.device, model.img_size
        grays = [to_rgb(it.image.image, it.image.window)[:, :, 0] for it in items]
        logits, features = self._classify(model, grays)
        presence = torch.tensor([float(it.positive) for it in items], device=device)
        segmented = [n for n, it in enumerate(items) if it.segmented and it.positive]
        side = 4 * model.prompt_encoder.image_embedding_size[0]
        cams = 0
        if segmented:
            inputs, boxes, targets = [], [], []
            for n in segmented:
                x, input_size = prepare_input(model, np.repeat(grays[n][:, :, None], 3, axis=2))
                box, from_cam = self._box(model, items[n], features[n], strategy, generators[n])
                cams += from_cam
                inputs.append(x)
                boxes.append(to_input_frame(np.asarray(box, dtype=np.float64).reshape(2, 2), grays[n].shape,
                                            img).reshape(4))
                targets.append(low_res_target(items[n].mask, input_size, img, device))
            box_t = torch.as_tensor(np.stack(boxes), dtype=torch.float32, device=device)
            mask_logits, _ = model.segment(model.encode(torch.cat(inputs)), box_t)
            target = torch.stack(targets)
        else:
            mask_logits = logits.new_zeros(0, 1, side, side)
            target = mask_logits.new_zeros(0, 1, side, side)
        loss, parts = self.loss_fn(logits.float(), presence, mask_logits.float(), target)
        parts.update({"segmented": float(len(segmented)), "cam_boxes": float(cams)})
        return loss, parts

    # ---- prediction ----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: SamMix, source: SliceImage, strategy: str, options: dict[str, Any]) -> np.ndarray:
        """The product's inference on one slice (``SamMix.predict_slice`` with the family's
        threshold, omega and largest_only), in eval mode; the model's mode is restored.
        ``strategy`` (the training box source) and the DeSAM grid ``options`` do not apply."""
        del strategy, options
        was_training = model.training
        model.eval()
        try:
            s = self.settings
            return model.predict_slice(source.image, source.window, threshold=s.threshold, omega=s.omega,
                                       largest_only=s.largest_only).mask
        finally:
            model.train(was_training)

    # ---- state and files ---------------------------------------------------------------------
    def trainable_state(self, model: SamMix) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in sammix_tensors(model).items()}

    def load_trainable_state(self, model: SamMix, state: dict[str, torch.Tensor]) -> None:
        ours = sammix_tensors(model)
        if set(ours) != set(state):
            raise ValueError("the saved state does not match this SamMix's trainable parts")
        device = model.device
        model.classifier.load_state_dict({k[11:]: v.to(device) for k, v in state.items()
                                          if k.startswith("classifier.")}, strict=True)
        model.mask_decoder.load_state_dict({k[13:]: v.to(device) for k, v in state.items()
                                            if k.startswith("mask_decoder.")}, strict=True)
        with torch.no_grad():
            for target, m in lora_modules(model.image_encoder).items():
                m.lora_a.weight.copy_(state[f"lora.{target}.lora_a.weight"])
                m.lora_b.weight.copy_(state[f"lora.{target}.lora_b.weight"])

    def save(self, model: SamMix, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        record = {**training, "sammix_settings": asdict(self.settings)}
        return save_sammix(model, path, structure=structure, inference=self.settings.inference(), training=record)

    def load(self, model: SamMix, path: Path) -> dict[str, Any]:
        return load_sammix_into(model, path)
