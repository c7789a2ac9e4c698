"""DeSAM's training: PRIM + PDMM on cached features (spec items 17-20).

Strategies:
- ``grid``: one point per sample, inside the structure or outside it with probability 1/2
  (always outside on a slice without the structure), given to the prompt encoder as a
  positive point; IoU target 1 when the point is inside, else 0. Loss: Dice + binary
  cross-entropy on the low-resolution logits + 10 x MSE on the predicted IoU (the
  paper's; weights in ``DeSAMLoss``).
- ``box``: the box covering the whole image region; Dice + cross-entropy only, the IoU
  head is frozen (not trained), and so are the parts that only feed it.

``NoFusionFamily`` (``desam_no_fusion``) is the ablation "PDMM without PRIM's
mask-embedding fusion" (``PDMM(fuse_mask_embedding=False)``): the same grid strategy, loss
and grid procedure; PRIM only scores prompts, PDMM's mask does not depend on them. Its
files have a format of their own, which the service refuses.

Dice and cross-entropy are MONAI's ``DiceCELoss`` (sigmoid, per-sample Dice, MONAI's
default smoothing 1e-5), the IoU term ``torch.nn.MSELoss``. On a slice with an empty
target the Dice term stays near its full 1 until every logit is below about -24
(measured: 1.0 at -8, 0.998 at -16, 0.20 at -24): empty training slices
(``empty_ratio``) pull the logits far below the mask threshold, and they hold up a
run's reported loss until they do (docs/DBSAM.md, "The paper's 12 epochs").
Targets live in the logits' frame: the label resized like the image (longest side to the
input size) and padded, at a quarter of the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.nn import functional as F

from ..engine.predictor import SlicePredictor
from ..engine.preprocess import to_input_frame
from ..modeling.build import without_fusion
from ..modeling.checkpoint import load_decoder, save_decoder
from ..modeling.desam import DeSAM, ImageFeatures
from .family import TrainItem

__all__ = ["DeSAMFamily", "NoFusionFamily", "NO_FUSION_FORMAT", "DeSAMTrainingModule", "DeSAMLoss", "low_res_target",
           "sample_point"]

STRATEGIES = ("grid", "box")
NO_FUSION_FORMAT = "desam-decoder-no-fusion"


class DeSAMTrainingModule(nn.Module):
    """PRIM + PDMM registered (what trains); the rest of the model is reached through a
    plain reference (not a submodule: frozen, never broadcast by DDP)."""

    def __init__(self, model: DeSAM) -> None:
        super().__init__()
        self.prim = model.prim
        self.pdmm = model.pdmm
        self._model = (model,)

    @property
    def model(self) -> DeSAM:
        return self._model[0]

    def forward(self, embedding: torch.Tensor, taps: Sequence[torch.Tensor], *,
                points: tuple[torch.Tensor, torch.Tensor] | None = None,
                boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.desam_forward(embedding, taps, points=points, boxes=boxes)


class DeSAMLoss:
    """dice + ce (MONAI DiceCELoss, sigmoid) + iou_weight x MSE(IoU) for ``grid``."""

    def __init__(self, *, dice_weight: float = 1.0, ce_weight: float = 1.0, iou_weight: float = 10.0) -> None:
        self.mask_loss = DiceCELoss(sigmoid=True, lambda_dice=dice_weight, lambda_ce=ce_weight)
        self.iou_loss = nn.MSELoss()
        self.iou_weight = iou_weight

    def __call__(self, logits, target, iou=None, iou_target=None) -> tuple[torch.Tensor, dict[str, float]]:
        mask = self.mask_loss(logits.float(), target)
        parts = {"mask": float(mask.detach())}
        if iou is None:
            return mask, parts
        iou_term = self.iou_loss(iou.float(), iou_target)
        parts["iou"] = float(iou_term.detach())
        return mask + self.iou_weight * iou_term, parts


def low_res_target(mask: np.ndarray, input_size: tuple[int, int], img_size: int, device) -> torch.Tensor:
    """bool H x W label -> 1 x L x L float target in the logits' frame (L = img_size / 4):
    resized to the input region (bilinear, threshold 0.5) and zero-padded."""
    side = img_size // 4
    h, w = (max(1, round(s * side / img_size)) for s in input_size)
    m = torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.float32, device=device)[None, None]
    m = (F.interpolate(m, (h, w), mode="bilinear", align_corners=False) > 0.5).float()
    return F.pad(m, (0, side - w, 0, side - h))[0]


def sample_point(mask: np.ndarray, positive: bool, generator: torch.Generator) -> tuple[np.ndarray, float]:
    """(x, y pixel centre in the slice frame, IoU target): inside with probability 1/2
    when the slice holds the structure, else outside."""
    inside = positive and bool(torch.rand((), generator=generator) < 0.5)
    candidates = np.flatnonzero(mask.reshape(-1) if inside else ~mask.reshape(-1))
    if candidates.size == 0:  # the structure fills the slice: only inside points exist
        inside, candidates = True, np.flatnonzero(mask.reshape(-1))
    pick = int(candidates[int(torch.randint(candidates.size, (), generator=generator))])
    r, c = divmod(pick, mask.shape[1])
    return np.array([c + 0.5, r + 0.5]), float(inside)


def point_prompts(items: Sequence[TrainItem], generators: Sequence[torch.Generator], img_size: int, device,
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The grid-points strategy's prompts of a batch: one ``sample_point`` per item as a
    positive point in the input frame ((B x 1 x 2 coords, B x 1 labels)) and the IoU
    targets (B)."""
    coords, iou_target = [], []
    for it, gen in zip(items, generators, strict=True):
        xy, inside = sample_point(it.mask, it.positive, gen)
        coords.append(to_input_frame(xy[None], it.features.original_size, img_size))
        iou_target.append(inside)
    pts = torch.as_tensor(np.stack(coords), dtype=torch.float32, device=device)
    labels = torch.ones(pts.shape[:2], dtype=torch.int, device=device)
    return (pts, labels), torch.tensor(iou_target, device=device)


class DeSAMFamily:
    name = "desam"
    strategies = STRATEGIES
    input_kind = "features"

    def __init__(self, loss: DeSAMLoss | None = None) -> None:
        self.loss_fn = loss or DeSAMLoss()

    #: whether the family's PDMM fuses PRIM's mask embedding (False: the ablation)
    fuses_mask_embedding = True

    def check_strategy(self, strategy: str) -> None:
        if strategy not in self.strategies:
            raise ValueError(f"unknown strategy {strategy!r}; the {self.name} family trains "
                             f"{' or '.join(repr(s) for s in self.strategies)}")

    def check_model(self, model: DeSAM) -> None:
        if model.pdmm.fuse_mask_embedding != self.fuses_mask_embedding:
            raise ValueError(f"the {self.name} family needs a PDMM "
                             f"{'with' if self.fuses_mask_embedding else 'without'} mask-embedding fusion: "
                             "pass the model through the family's prepare_model first")

    def prepare_model(self, model: DeSAM) -> DeSAM:
        """DeSAM trains the model as built (PRIM from SAM's decoder, PDMM random)."""
        return model

    def training_module(self, model: DeSAM, strategy: str) -> DeSAMTrainingModule:
        self.check_strategy(strategy)
        self.check_model(model)
        model.freeze_frozen_parts()
        for p in model.trainable_parameters():
            p.requires_grad_(True)
        if strategy == "box":
            # Spec item 19: the IoU head is not trained; nor are the transformer's last
            # token-to-image attention and its norm, which only update the tokens the IoU
            # head reads (the mask embedding is the image side): without a gradient there,
            # DDP would wait for one.
            t = model.prim.transformer
            for module in (model.prim.iou_prediction_head, t.final_attn_token_to_image, t.norm_final_attn):
                for p in module.parameters():
                    p.requires_grad_(False)
        model.prim.train()
        model.pdmm.train()
        return DeSAMTrainingModule(model)

    @staticmethod
    def _batch(items: Sequence[TrainItem]):
        embedding = torch.cat([it.features.embedding for it in items])
        taps = [torch.cat([it.features.taps[t] for it in items]) for t in range(len(items[0].features.taps))]
        return embedding, taps

    def loss(self, module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        model = model_module(module).model
        device = model.device
        img = model.img_size
        embedding, taps = self._batch(items)
        target = torch.stack([low_res_target(it.mask, it.features.input_size, img, device) for it in items])
        if strategy == "box":
            boxes = []
            for it in items:
                h, w = it.features.original_size
                boxes.append(to_input_frame(np.array([[0.0, 0.0], [w, h]]), (h, w), img).reshape(4))
            box_t = torch.as_tensor(np.stack(boxes), dtype=torch.float32, device=device)
            _, logits = module(embedding, taps, boxes=box_t)
            return self.loss_fn(logits, target)
        points, iou_target = point_prompts(items, generators, img, device)
        iou, logits = module(embedding, taps, points=points)
        return self.loss_fn(logits, target, iou, iou_target)

    def optimizer(self, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=0.0)

    def after_step(self, model: DeSAM) -> None:
        model.weights_changed()

    def predict(self, model: DeSAM, features: ImageFeatures, strategy: str, options: dict[str, Any]) -> np.ndarray:
        predictor = SlicePredictor(model, precision="fp32")
        predictor.set_features(features)
        result = predictor.predict_auto(strategy, grid_size=int(options.get("grid_size", 9)),
                                        min_region_area=int(options.get("min_region_area", 64)),
                                        iou_threshold=float(options.get("iou_threshold", 0.5)),
                                        allow_untrained=True)
        return result.mask

    def trainable_state(self, model: DeSAM) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().clone() for name, m in model.decoder_modules().items()
                for k, v in m.state_dict().items()}

    def load_trainable_state(self, model: DeSAM, state: dict[str, torch.Tensor]) -> None:
        for name, m in model.decoder_modules().items():
            prefix = name + "."
            m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        model.weights_changed()

    def save(self, model: DeSAM, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        return save_decoder(model, path, structure=structure, training=training)

    def load(self, model: DeSAM, path: Path) -> dict[str, Any]:
        return load_decoder(model, path)


class NoFusionFamily(DeSAMFamily):
    """The ablation: PRIM + PDMM without the mask-embedding fusion, grid strategy only (with
    the whole box PRIM would get no gradient at all). ``prepare_model`` builds the variant
    (``modeling.build.without_fusion``: the same frozen parts, PRIM copied, PDMM new)."""

    name = "desam_no_fusion"
    strategies = ("grid",)
    fuses_mask_embedding = False

    def prepare_model(self, model: DeSAM) -> DeSAM:
        return model if not model.pdmm.fuse_mask_embedding else without_fusion(model)

    def save(self, model: DeSAM, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        self.check_model(model)
        return save_decoder(model, path, structure=structure, training=training, format=NO_FUSION_FORMAT)

    def load(self, model: DeSAM, path: Path) -> dict[str, Any]:
        self.check_model(model)
        return load_decoder(model, path, format=NO_FUSION_FORMAT)


def model_module(module) -> DeSAMTrainingModule:
    """The training module, inside DDP's wrapper or not."""
    return module.module if hasattr(module, "module") else module
