"""SAM's own mask decoder fine-tuned on cached features: the comparison of the evidence's
grid-size robustness table (issue #11, evidence item 2; the paper's "SAM fine-tuned"
baseline), trained and evaluated through the same machinery as DeSAM.

Strategy ``grid`` only, as DeSAM's (``desam_family``): one point per sample, inside the
structure or outside it with probability 1/2 (always outside on a slice without it), given
as a positive point; IoU target 1 when inside, else 0. Loss: DeSAM's (``DeSAMLoss``: Dice
+ binary cross-entropy on the decoder's single-mask low-resolution logits, i.e.
``multimask_output=False``, + 10 x MSE on its predicted IoU). Trainable: the model's
``mask_decoder`` (trained in place); encoder and prompt encoder frozen, PRIM + PDMM unused.

Prediction: the grid procedure of DeSAM's grid mode (``engine.grid_mode``) with SAM's
decoder: n x n single positive points, scored and decoded in one pass each (SAM's decoder
gives the mask with its IoU), drop IoU <= threshold, logit > 0, small regions removed,
box NMS ranked by IoU, top survivor.

Files: the mask decoder's weights (``mask_decoder.*``) in the decoder container with format
``sam-mask-decoder``: not a DeSAM decoder, the service refuses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..engine.grid_mode import choose_lazily
from ..engine.postprocess import grid_points
from ..engine.preprocess import to_input_frame
from ..modeling.checkpoint import load_modules, save_modules
from ..modeling.desam import DeSAM, ImageFeatures
from ..modeling.fast_path import FastPath
from .desam_family import DeSAMLoss, low_res_target, model_module, point_prompts
from .family import TrainItem

__all__ = ["SAMDecoderFamily", "SAMDecoderTrainingModule", "SAM_DECODER_FORMAT", "sam_grid_predict"]

SAM_DECODER_FORMAT = "sam-mask-decoder"


class SAMDecoderTrainingModule(nn.Module):
    """SAM's mask decoder registered (what trains); the rest of the model through a plain
    reference (frozen, never broadcast by DDP)."""

    def __init__(self, model: DeSAM) -> None:
        super().__init__()
        self.mask_decoder = model.mask_decoder
        self._model = (model,)

    @property
    def model(self) -> DeSAM:
        return self._model[0]

    def forward(self, embeddings: Sequence[torch.Tensor], points: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings: one 1 x 256 x E x E per sample (SAM's decoder takes one image per
        call); points: (B x N x 2 coords, B x N labels) -> (iou B, logits B x 1 x 4E x 4E),
        through the modules as written."""
        ious, logits = [], []
        for n, embedding in enumerate(embeddings):
            low_res, iou = self.model.sam_decode(embedding, points=(points[0][n : n + 1], points[1][n : n + 1]),
                                                 boxes=None, mask_input=None, multimask_output=False)
            logits.append(low_res)
            ious.append(iou[:, 0])
        return torch.cat(ious), torch.cat(logits)


@torch.inference_mode()
def sam_grid_predict(model: DeSAM, features: ImageFeatures, *, grid_size: int = 9, iou_threshold: float = 0.5,
                     min_region_area: int = 64, chunk_size: int | None = None, fast: FastPath | None = FastPath(),
                     ) -> np.ndarray:
    """The grid procedure with SAM's decoder (single mask per prompt): bool H x W.
    chunk_size: prompts per decoder call (None: 16 on a GPU, 1 on a CPU, as DeSAM's)."""
    device = model.device
    if chunk_size is None:
        chunk_size = 16 if device.type == "cuda" else 1
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    h, w = features.original_size
    pts = to_input_frame(grid_points(grid_size, h, w), features.original_size, model.img_size)
    coords = torch.as_tensor(pts, dtype=torch.float, device=device)[:, None, :]
    labels = torch.ones((coords.shape[0], 1), dtype=torch.int, device=device)
    ious, kept = [], {}
    for start in range(0, coords.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        low_res, iou = model.sam_decode(features.embedding, points=(coords[chunk], labels[chunk]), boxes=None,
                                        mask_input=None, multimask_output=False, fast=fast,
                                        state=features.decoder_state)
        iou = iou[:, 0]
        ious.append(iou)
        keep = iou > iou_threshold
        kept.update(zip((start + keep.nonzero()[:, 0]).tolist(), low_res[keep], strict=True))

    def decode(batch):
        logits = torch.stack([kept[i] for i in batch])
        return (model.postprocess_logits(logits, features.input_size, features.original_size)[:, 0] > 0).cpu().numpy()

    return choose_lazily(torch.cat(ious), decode, iou_threshold=iou_threshold, min_region_area=min_region_area,
                         shape=(h, w)).mask


class MaskDecoderState:
    """The trained part of a family that fine-tunes SAM's mask decoder alone: its state for
    resuming and its file (``sam-mask-decoder``). Shared by ``SAMDecoderFamily`` and DB-SAM's
    decoder-only ablation row."""

    def trainable_state(self, model: DeSAM) -> dict[str, torch.Tensor]:
        return {f"mask_decoder.{k}": v.detach().clone() for k, v in model.mask_decoder.state_dict().items()}

    def load_trainable_state(self, model: DeSAM, state: dict[str, torch.Tensor]) -> None:
        prefix = "mask_decoder."
        model.mask_decoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                           strict=True)
        model.weights_changed()

    def save(self, model: DeSAM, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        return save_modules(model, path, {"mask_decoder": model.mask_decoder}, format=SAM_DECODER_FORMAT,
                            structure=structure, training=training)

    def load(self, model: DeSAM, path: Path) -> dict[str, Any]:
        return load_modules(model, path, {"mask_decoder": model.mask_decoder}, format=SAM_DECODER_FORMAT)


class SAMDecoderFamily(MaskDecoderState):
    name = "sam_decoder"
    strategies = ("grid",)
    input_kind = "features"

    def __init__(self, loss: DeSAMLoss | None = None) -> None:
        self.loss_fn = loss or DeSAMLoss()

    def check_strategy(self, strategy: str) -> None:
        if strategy not in self.strategies:
            raise ValueError(f"the sam_decoder family trains the 'grid' strategy only, not {strategy!r}")

    def prepare_model(self, model: DeSAM) -> DeSAM:
        """SAM's decoder trains in place, in the model given."""
        return model

    def training_module(self, model: DeSAM, strategy: str) -> SAMDecoderTrainingModule:
        self.check_strategy(strategy)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.mask_decoder.parameters():
            p.requires_grad_(True)
        model.mask_decoder.train()
        return SAMDecoderTrainingModule(model)

    def loss(self, module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        self.check_strategy(strategy)
        model = model_module(module).model
        device, img = model.device, model.img_size
        target = torch.stack([low_res_target(it.mask, it.features.input_size, img, device) for it in items])
        points, iou_target = point_prompts(items, generators, img, device)
        iou, logits = module([it.features.embedding for it in items], points)
        return self.loss_fn(logits, target, iou, iou_target)

    def optimizer(self, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=0.0)

    def after_step(self, model: DeSAM) -> None:
        model.weights_changed()  # the fast path's constants derive from the mask decoder's weights

    def predict(self, model: DeSAM, features: ImageFeatures, strategy: str, options: dict[str, Any]) -> np.ndarray:
        self.check_strategy(strategy)
        return sam_grid_predict(model, features, grid_size=int(options.get("grid_size", 9)),
                                iou_threshold=float(options.get("iou_threshold", 0.5)),
                                min_region_area=int(options.get("min_region_area", 64)))
