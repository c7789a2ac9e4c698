"""The SAM-Mix assembly: a slice classifier whose class activation map gives a box prompt
to SAM with a LoRA-adapted image encoder and a trainable mask decoder (Ward and Imran,
ISBI 2025; see docs/SAMMIX.md).

What trains: the classifier (all of it), the encoder's LoRA adapters (A and B of every
attention ``qkv``) and SAM's mask decoder. Frozen: the encoder's base weights (patch
embedding, blocks, neck) and SAM's prompt encoder. ``build_sammix`` copies what it takes
from a DeSAM model, so that model is never changed by training a SAM-Mix.

Inference (``predict_slice``) uses SAM's single-mask output (mask token 0), as training
does: a box is an unambiguous prompt (SAM's own advice; MedSAM trains and predicts so),
and the Dice loss trains that one output, so the three multimask outputs would be picked
among by an IoU head that training never saw.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn
from torch.nn import functional as F

from ..modeling.cam import cam_boxes
from ..modeling.desam import DeSAM, InputConvention, postprocess_logits
from ..modeling.lora import add_lora, lora_modules, lora_parameters, merge_lora
from ..modeling.slice_classifier import SliceClassifier
from .preprocess import IntensityWindow, prepare_input, to_input_frame, to_rgb


@dataclass(frozen=True)
class SamMixPrediction:
    """One slice's answer.

    probability: the classifier's presence probability, sigmoid(logit);
    box: (x0, y0, x1, y1) in the slice's pixel frame (x column, y row, x1 and y1
      exclusive), the largest activated region's CAM box; None when the slice was called
      absent or the map gave no box;
    mask: H x W bool in the slice frame, the union of SAM's masks for ``boxes`` (all
      False without a box);
    iou: SAM's predicted IoU of the mask for ``box``; None without a box;
    boxes, ious: every box that prompted SAM (largest region first; just ``box`` with
      ``largest_only``) and each one's predicted IoU; empty without a box.
    """

    probability: float
    box: tuple[int, int, int, int] | None
    mask: np.ndarray
    iou: float | None
    boxes: tuple[tuple[int, int, int, int], ...] = ()
    ious: tuple[float, ...] = ()


@dataclass(frozen=True)
class Location:
    """The classifier's answer for one slice (``locate``): probability = sigmoid(logit);
    boxes: the CAM boxes (x0, y0, x1, y1, slice pixels, largest region first), empty when
    the slice was called absent or the map gave none; gray: the windowed slice (uint8 H x
    W) the classifier saw, which SAM's input is made of."""

    probability: float
    boxes: tuple[tuple[int, int, int, int], ...]
    gray: np.ndarray


@torch.no_grad()
def locate(classifier: SliceClassifier, slice_hw: np.ndarray, window: IntensityWindow | None, *,
           device: torch.device, threshold: float = 0.5, omega: float = 0.5, largest_only: bool = True) -> Location:
    """Classify one slice and, when the probability reaches ``threshold``, cut the box
    prompts from its class activation map at ``g >= omega * max(g)`` (``cam_boxes``).
    The classifier must be in eval mode (its batch norm would otherwise use this slice's
    statistics). Shared by ``SamMix.predict_slice`` and the serving form
    (``sammix_serving``); ``device``: where the classifier's weights are."""
    if classifier.training:
        raise RuntimeError("the classifier must be in eval mode: in train mode its batch norm would use and "
                           "update this slice's statistics")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if classifier.in_chans != 1:
        raise ValueError(f"the classifier is fed one windowed slice; this one wants {classifier.in_chans} channels")
    image = np.asarray(slice_hw)
    if image.ndim != 2:
        raise ValueError(f"expected an H x W slice, got shape {image.shape}")
    gray = to_rgb(image, window)[:, :, 0]  # the engine's windowing and its checks
    out = classifier(SamMix.classifier_input(gray, device))
    probability = float(torch.sigmoid(out.logits[0].float()))
    if probability < threshold:
        return Location(probability, (), gray)
    cam = classifier.class_activation_map(out.features, size=gray.shape)[0]
    regions = cam_boxes(cam, omega, largest_only=largest_only)
    return Location(probability, tuple(r.xyxy() for r in regions), gray)


class SamMix(nn.Module):
    """Keyword-only arguments: the modules (already built, see ``build_sammix``), the
    encoder's registry name and its input convention.

    classifier: ``SliceClassifier`` on B x in_chans x H x W windowed slices in [0, 1]
      (any module with its interface: ``in_chans``, ``forward`` -> ``ClassifierOutput``,
      ``class_activation_map``);
    image_encoder: a SAM-family encoder returning ``(embedding, taps)``, normally carrying
      LoRA adapters (``add_lora``) or merged ones (``merged()``);
    prompt_encoder, mask_decoder: SAM's.
    """

    mask_threshold: float = 0.0

    def __init__(self, *, encoder_name: str, classifier: SliceClassifier, image_encoder: nn.Module,
                 prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, convention: InputConvention,
                 encoder_weights_sha256: str | None = None) -> None:
        super().__init__()
        self.encoder_name = encoder_name
        #: sha256 of the base encoder's checkpoint (None: random weights), as on ``DeSAM``
        self.encoder_weights_sha256 = encoder_weights_sha256
        self.classifier = classifier
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.convention = convention
        self.register_buffer("pixel_mean", torch.tensor(convention.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(convention.pixel_std).view(-1, 1, 1), False)

    # ---- what the engine's preprocessing needs (``prepare_input``) ------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.convention.img_size

    def normalize_and_pad(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w on the 0-255 scale (longest side img_size) -> B x 3 x S x S."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    # ---- parameters ---------------------------------------------------------------------
    @property
    def is_merged(self) -> bool:
        """True when the encoder carries no LoRA adapter (``merged()``)."""
        return not lora_modules(self.image_encoder)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Classifier, LoRA A and B, mask decoder: what the optimizer gets."""
        return [*self.classifier.parameters(), *lora_parameters(self.image_encoder), *self.mask_decoder.parameters()]

    def set_trainable(self) -> None:
        """requires_grad True exactly on ``trainable_parameters()``, False elsewhere."""
        self.requires_grad_(False)
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    # ---- training ----------------------------------------------------------------------
    def encode(self, images_for_sam: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalised padded input -> B x 256 x E x E embedding."""
        embedding, _ = self.image_encoder(images_for_sam)
        return embedding

    def segment(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder and mask decoder, single-mask output.

        embedding: B x 256 x E x E, one per box, or 1 x 256 x E x E shared by B boxes;
        boxes: B x 4, XYXY in the resized input frame (``to_input_frame``).
        Returns (low-res logits B x 1 x 4E x 4E in the padded input frame, iou B).
        """
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        pe = self.prompt_encoder.get_dense_pe()
        if embedding.shape[0] == 1:  # one slice, B boxes: SAM's decoder repeats the embedding per prompt
            low, score = self.mask_decoder(image_embeddings=embedding, image_pe=pe, sparse_prompt_embeddings=sparse,
                                           dense_prompt_embeddings=dense, multimask_output=False)
            return low, score[:, 0]
        if embedding.shape[0] != boxes.shape[0]:
            raise ValueError(f"{embedding.shape[0]} embeddings for {boxes.shape[0]} boxes")
        logits, iou = [], []
        for i in range(boxes.shape[0]):  # each image's box against its own embedding
            low, score = self.mask_decoder(image_embeddings=embedding[i:i + 1], image_pe=pe,
                                           sparse_prompt_embeddings=sparse[i:i + 1],
                                           dense_prompt_embeddings=dense[i:i + 1], multimask_output=False)
            logits.append(low)
            iou.append(score[:, 0])
        return torch.cat(logits), torch.cat(iou)

    def forward_train(self, images_for_sam: torch.Tensor, images_for_classifier: torch.Tensor,
                      boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One multitask step's forward.

        images_for_classifier: B x in_chans x H x W, every slice with a presence label,
          windowed, in [0, 1];
        images_for_sam: N x 3 x S x S, normalised padded SAM input of the N segmented
          slices that hold the structure (N may be 0; they need not be among the B);
        boxes: N x 4 XYXY in the resized input frame, their prompts (the caller chooses:
          ground-truth boxes, CAM boxes, or a mix; see docs/SAMMIX.md).
        Returns (presence logits B, low-res mask logits N x 1 x 4E x 4E, predicted IoU N).
        """
        logits = self.classifier(images_for_classifier).logits
        if images_for_sam.shape[0] != boxes.shape[0]:
            raise ValueError(f"{images_for_sam.shape[0]} SAM images for {boxes.shape[0]} boxes")
        if boxes.shape[0] == 0:
            side = 4 * self.prompt_encoder.image_embedding_size[0]
            empty = logits.new_zeros(0, 1, side, side)
            return logits, empty, logits.new_zeros(0)
        low_res, iou = self.segment(self.encode(images_for_sam), boxes)
        return logits, low_res, iou

    # ---- inference ---------------------------------------------------------------------
    @staticmethod
    def classifier_input(gray: np.ndarray, device: torch.device) -> torch.Tensor:
        """H x W uint8 windowed slice -> 1 x 1 x H x W float in [0, 1] (native size)."""
        return torch.as_tensor(np.ascontiguousarray(gray), device=device).float()[None, None] / 255.0

    @torch.no_grad()
    def predict_box(self, slice_hw: np.ndarray, window: IntensityWindow | None,
                    box: tuple[float, float, float, float]) -> tuple[np.ndarray, float]:
        """SAM with this encoder on one slice and one box in its pixel frame (x0, y0, x1,
        y1): (H x W bool mask, predicted IoU). Preprocessing and box mapping are the
        engine's (``prepare_input``, ``to_input_frame``), as ``SlicePredictor``'s."""
        rgb = to_rgb(slice_hw, window)
        masks, ious = self._segment_rgb(rgb, [box])
        return masks[0], ious[0]

    def _segment_rgb(self, rgb: np.ndarray, boxes) -> tuple[np.ndarray, list[float]]:
        """K boxes (x0, y0, x1, y1, slice pixels) on one H x W x 3 uint8 slice, one encoder
        pass: (K x H x W bool masks, K predicted IoUs)."""
        x, input_size = prepare_input(self, rgb)
        original_size = tuple(rgb.shape[:2])
        b = to_input_frame(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2), original_size, self.img_size)
        prompts = torch.as_tensor(b.reshape(-1, 4), dtype=torch.float, device=self.device)
        low_res, iou = self.segment(self.encode(x), prompts)
        masks = postprocess_logits(low_res, input_size, original_size, img_size=self.img_size)[:, 0]
        return (masks > self.mask_threshold).cpu().numpy(), [float(v) for v in iou]

    @torch.no_grad()
    def predict_slice(self, slice_hw: np.ndarray, window: IntensityWindow | None, *, threshold: float = 0.5,
                      omega: float = 0.5, largest_only: bool = True) -> SamMixPrediction:
        """Classify -> if present, CAM box -> SAM with this encoder -> mask.

        slice_hw: H x W intensities (with ``window``) or uint8 (window None);
        threshold: presence probability at or above which the slice counts as holding the
          structure; omega: the CAM threshold as a fraction of its maximum (``cam_boxes``);
        largest_only: prompt SAM with the largest activated region's box only (True), or
          with each region's box (False; one encoder pass, the masks united).
        Absent (probability below threshold, or no box from the map): no box, empty mask.
        Refused in train mode: the classifier's batch norm would normalise by this one
        slice's statistics and move its running statistics; call ``eval()`` first.
        """
        if self.training:
            raise RuntimeError("predict_slice needs eval mode (call eval()): in train mode the classifier's "
                               "batch norm would use and update this slice's statistics")
        found = locate(self.classifier, slice_hw, window, device=self.device, threshold=threshold, omega=omega,
                       largest_only=largest_only)
        empty = np.zeros(found.gray.shape, dtype=bool)
        if not found.boxes:
            return SamMixPrediction(probability=found.probability, box=None, mask=empty, iou=None)
        masks, ious = self._segment_rgb(np.repeat(found.gray[:, :, None], 3, axis=2), found.boxes)
        return SamMixPrediction(probability=found.probability, box=found.boxes[0], mask=masks.any(axis=0),
                                iou=ious[0], boxes=found.boxes, ious=tuple(ious))

    # ---- serving form -------------------------------------------------------------------
    def merged(self) -> SamMix:
        """A new SamMix (copies; this one unchanged) whose encoder has the LoRA merged
        into its weights (``merge_lora``): no adapter left, the base encoder's cost and
        state-dict layout. In eval mode, every parameter frozen. Equal to this model up to
        float32 rounding."""
        if self.is_merged:
            raise ValueError("this SamMix's encoder carries no LoRA adapter to merge")
        out = SamMix(encoder_name=self.encoder_name, classifier=copy.deepcopy(self.classifier),
                     image_encoder=merge_lora(self.image_encoder, copy=True),
                     prompt_encoder=copy.deepcopy(self.prompt_encoder),
                     mask_decoder=copy.deepcopy(self.mask_decoder), convention=self.convention,
                     encoder_weights_sha256=self.encoder_weights_sha256)
        return out.to(self.device).requires_grad_(False).eval()


def build_sammix(model: DeSAM, *, classifier_depth: int = 50, classifier_output_stride: int | None = None,
                 rank: int = 8, lora_alpha: float | None = None, include_proj: bool = False) -> SamMix:
    """A SamMix from a DeSAM (or any model with ``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``, ``encoder_name`` and ``convention``), on its device, in train mode
    with ``set_trainable()`` applied.

    The encoder is a LoRA-adapted deep copy (``add_lora``: rank, lora_alpha, include_proj;
    rank 8 is the paper's); the prompt encoder and mask decoder are deep copies, so
    ``model`` is never changed. The classifier is a new ``SliceClassifier(depth=
    classifier_depth, in_chans=1, output_stride=classifier_output_stride)``.
    """
    encoder = add_lora(model.image_encoder, rank=rank, alpha=lora_alpha, include_proj=include_proj, copy=True)
    sammix = SamMix(encoder_name=model.encoder_name,
                    classifier=SliceClassifier(depth=classifier_depth, output_stride=classifier_output_stride),
                    image_encoder=encoder, prompt_encoder=copy.deepcopy(model.prompt_encoder),
                    mask_decoder=copy.deepcopy(model.mask_decoder), convention=model.convention,
                    encoder_weights_sha256=getattr(model, "encoder_weights_sha256", None))
    sammix = sammix.to(model.device)
    sammix.set_trainable()
    return sammix.train()
