"""SlicePredictor: encode a slice once, then answer many prompts cheaply.

Shaped like ``segment_anything.SamPredictor``: ``set_image`` then ``predict`` (SAM's own
prompted decoder; same argument meanings, coordinate frame and outputs), plus
``predict_auto`` for DeSAM's prompt-free whole-box and grid-points modes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.desam import DeSAM, ImageFeatures
from ..modeling.fast_path import FastPath
from .grid_mode import choose_lazily
from .postprocess import grid_points, remove_small_regions
from .preprocess import IntensityWindow, prepare_input, to_input_frame, to_rgb
from .runtime import Precision, choose_precision

HOW_TO_GET_A_DECODER = (
    "DeSAM's automatic modes need a trained DeSAM decoder (PRIM + PDMM) for this encoder; "
    "PDMM starts from random weights and its output would be meaningless. None ships with "
    "SlicerDeSAM: run `make decoders` (MobileSAM: head, brain) or `desam-server train` on your "
    "cases, then pass the decoder file (--decoder with `desam-server segment` or `desam-server "
    "serve`, decoder_checkpoint=... in build_desam; the service also serves its decoder "
    "registry), or use the prompted mode (points or a box: `desam-server segment --mode "
    "prompt`, POST /segment/prompt)."
)


class UntrainedDecoderError(RuntimeError):
    """Automatic segmentation was asked of a model without a trained DeSAM decoder."""


@dataclass
class AutoResult:
    """Result of an automatic mode on one slice.

    mask: H x W bool in the original slice frame (empty when nothing survived);
    iou: the predicted IoU of the chosen mask (nan when empty);
    candidates: prompts scored by PRIM; passed: prompts over the IoU threshold;
    decoded: prompts that went through PDMM's prompt-dependent part.
    """

    mask: np.ndarray
    iou: float
    candidates: int
    passed: int
    decoded: int


class SlicePredictor:
    """Arguments: a DeSAM model (already on its device); ``precision`` 'auto', 'fp32',
    'bf16' or 'fp16' for the encoder pass (decoders always run in fp32); ``fast``: the
    decoders' inference fast path (``FastPath``: all parts by default), or None to run the
    modules as written. Decoder passes run under ``torch.inference_mode`` (about 15% faster
    on CPU than ``no_grad``)."""

    def __init__(self, model: DeSAM, *, precision: str | Precision = "auto",
                 fast: FastPath | None = FastPath()) -> None:
        self.model = model
        self.precision = precision if isinstance(precision, Precision) else choose_precision(model.device, precision)
        self.fast = fast
        self.features: ImageFeatures | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_image_set(self) -> bool:
        return self.features is not None

    def reset_image(self) -> None:
        self.features = None

    # ---- image -------------------------------------------------------------------------
    @torch.no_grad()
    def set_image(self, image: np.ndarray, window: IntensityWindow | None = None, *,
                  between_steps: Callable[[], None] | None = None) -> None:
        """Encode one slice: H x W intensities (with ``window``; uint8 needs none) or
        H x W x 3 uint8 RGB. Keeps the neck embedding and the taps for later prompts.
        between_steps: see ``DeSAM.encode``."""
        rgb = to_rgb(image, window)
        x, input_size = prepare_input(self.model, rgb)
        with self.precision.autocast():
            embedding, taps = self.model.encode(x, between_steps=between_steps)
        self.set_features(
            ImageFeatures(
                embedding=embedding.float(),
                taps=[t.float() for t in taps],
                input_size=input_size,
                original_size=tuple(rgb.shape[:2]),
            )
        )

    def set_features(self, features: ImageFeatures) -> None:
        """Adopt precomputed features (e.g. from a cache) instead of encoding."""
        self.features = features

    def _require_image(self) -> ImageFeatures:
        if self.features is None:
            raise RuntimeError("An image must be set with set_image(...) before prediction.")
        return self.features

    # ---- prompted mode -------------------------------------------------------------------
    def _prompt_tensors(self, point_coords, point_labels, box):
        feats = self._require_image()
        h, w = feats.original_size
        points = boxes = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = np.asarray(point_coords, dtype=np.float64).reshape(-1, 2)
            labels = np.asarray(point_labels).reshape(-1)
            if coords.shape[0] != labels.shape[0] or coords.shape[0] == 0:
                raise ValueError("point_coords (N x 2) and point_labels (N) must have the same N >= 1")
            if not np.isfinite(coords).all():
                raise ValueError("point coordinates must be finite")
            if not np.isin(labels, (0, 1)).all():
                raise ValueError("point labels must be 1 (foreground) or 0 (background)")
            if not ((0 <= coords[:, 0]) & (coords[:, 0] <= w) & (0 <= coords[:, 1]) & (coords[:, 1] <= h)).all():
                raise ValueError(f"points must lie inside the {w} x {h} slice (x in [0, {w}], y in [0, {h}])")
            if not self.model.convention.supports_points:
                raise ValueError(f"encoder {self.model.encoder_name} was trained with box prompts only")
            coords = to_input_frame(coords, feats.original_size, self.model.img_size)
            points = (
                torch.as_tensor(coords, dtype=torch.float, device=self.device)[None],
                torch.as_tensor(labels, dtype=torch.int, device=self.device)[None],
            )
        if box is not None:
            b = np.asarray(box, dtype=np.float64).reshape(-1)
            if b.shape != (4,) or not np.isfinite(b).all():
                raise ValueError("box must be 4 finite numbers x0, y0, x1, y1")
            if b[2] <= b[0] or b[3] <= b[1]:
                raise ValueError("box must have x1 > x0 and y1 > y0")
            if b[0] < 0 or b[1] < 0 or b[2] > w or b[3] > h:
                raise ValueError(f"box must lie inside the {w} x {h} slice")
            b = to_input_frame(b.reshape(2, 2), feats.original_size, self.model.img_size).reshape(1, 4)
            boxes = torch.as_tensor(b, dtype=torch.float, device=self.device)
        return points, boxes

    @torch.inference_mode()
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """SAM's prompted decoder on the current slice.

        point_coords: N x 2 (x, y) in original slice pixels; point_labels: N (1 fg, 0 bg);
        box: x0, y0, x1, y1 in original pixels; mask_input: 1 x L x L low-res logits from a
        previous call (L = 4E: 256 for SAM). Returns (masks C x H x W (bool, or float
        logits with return_logits), iou scores C, low-res logits C x L x L), C = 3 with
        multimask_output else 1.
        """
        feats = self._require_image()
        points, boxes = self._prompt_tensors(point_coords, point_labels, box)
        if points is None and boxes is None and mask_input is None:
            raise ValueError("give at least one prompt: points, a box or a mask")
        mask_tensor = None
        if mask_input is not None:
            side = 4 * self.model.prompt_encoder.image_embedding_size[0]
            m = np.asarray(mask_input, dtype=np.float32)
            if m.shape != (1, side, side) or not np.isfinite(m).all():
                raise ValueError(f"mask_input must be finite logits of shape 1 x {side} x {side}")
            mask_tensor = torch.as_tensor(m, device=self.device)[None]
        low_res, iou = self.model.sam_decode(
            feats.embedding, points=points, boxes=boxes, mask_input=mask_tensor,
            multimask_output=multimask_output, fast=self.fast, state=feats.decoder_state,
        )
        masks = self._postprocess(low_res, feats)
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks[0].cpu().numpy(), iou[0].float().cpu().numpy(), low_res[0].float().cpu().numpy()

    @torch.inference_mode()
    def predict_desam(
        self, point_coords: np.ndarray | None = None, point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """DeSAM's decoders (PRIM + PDMM) with a user prompt: (H x W bool mask, predicted
        IoU). Same prompt arguments as ``predict``; needs a trained decoder."""
        if not self.model.has_trained_decoder:
            raise UntrainedDecoderError(HOW_TO_GET_A_DECODER)
        feats = self._require_image()
        points, boxes = self._prompt_tensors(point_coords, point_labels, box)
        if points is None and boxes is None:
            raise ValueError("give at least one prompt: points or a box")
        iou, logits = self.model.desam_decode(feats.embedding, self._skips(feats), points=points, boxes=boxes,
                                              fast=self.fast, state=feats.decoder_state)
        mask = self._postprocess(logits, feats)[0, 0] > 0
        return mask.cpu().numpy(), float(iou[0])

    def _postprocess(self, logits: torch.Tensor, feats: ImageFeatures) -> torch.Tensor:
        return self.model.postprocess_logits(logits, feats.input_size, feats.original_size)

    # ---- automatic (DeSAM) modes ----------------------------------------------------------
    def _skips(self, feats: ImageFeatures, between_steps: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """PDMM's image part: kept in the slice's decoder state with the fast path, else
        computed per call (the modules as written, nothing kept)."""
        if self.fast is None or not self.fast.slice_cache:
            return self.model.image_skips(feats.taps, between_steps=between_steps)
        return self.model.slice_skips(feats, between_steps=between_steps)

    @torch.inference_mode()
    def predict_auto(
        self,
        mode: str = "box",
        grid_size: int = 9,
        *,
        iou_threshold: float = 0.5,
        min_region_area: int = 64,
        chunk_size: int | None = None,
        decode_chunk: int = 1,
        between_steps: Callable[[], None] | None = None,
        allow_untrained: bool = False,
    ) -> AutoResult:
        """DeSAM without a user prompt.

        mode 'box': one forward with the box covering the whole slice; no IoU filtering;
          holes and islands smaller than ``min_region_area`` pixels are removed.
        mode 'grid': grid_size x grid_size single positive points. The procedure (spec
          item 22, ``grid_mode``): drop predictions with IoU <= iou_threshold, threshold
          masks at logit 0, remove holes and islands smaller than ``min_region_area``, drop
          empty masks, box NMS at 0.7 ranked by IoU, return the top-ranked survivor. NMS
          always keeps the highest-ranked box, so the result is the highest-IoU candidate
          whose cleaned mask is non-empty. It is computed that way
          (``grid_mode.choose_lazily``): PRIM scores every prompt (in chunks of
          ``chunk_size``), then PDMM decodes candidates in decreasing IoU order,
          ``decode_chunk`` at a time, until one survives. Same result, a fraction of the
          decoder work. ``chunk_size`` None: 16 on a GPU, 1 on a CPU (batched PRIM
          passes expand the image embedding per prompt, which costs more than it saves
          there: 81 prompts 8.2 s at 16, 4.9 s at 1 with MobileSAM on 2 cores).
        between_steps: called between the steps of the computation (each PRIM chunk, PDMM's
          stages and blocks): a caller's chance to run other work (the service serves
          clicks there during a batch job). Nothing is installed on the model.
        allow_untrained: run without a loaded decoder file (validation while training);
          otherwise a model whose PRIM + PDMM were never loaded is refused.
        """
        if not self.model.has_trained_decoder and not allow_untrained:
            raise UntrainedDecoderError(HOW_TO_GET_A_DECODER)
        feats = self._require_image()
        h, w = feats.original_size
        if mode == "box":
            box = to_input_frame(np.array([[0.0, 0.0], [w, h]]), feats.original_size, self.model.img_size)
            boxes = torch.as_tensor(box.reshape(1, 4), dtype=torch.float, device=self.device)
            iou, logits = self.model.desam_decode(feats.embedding, self._skips(feats, between_steps), boxes=boxes,
                                                  fast=self.fast, state=feats.decoder_state,
                                                  between_steps=between_steps)
            mask = self._postprocess(logits, feats)[0, 0] > 0
            mask = remove_small_regions(mask.cpu().numpy(), min_region_area)
            return AutoResult(mask=mask, iou=float(iou[0]), candidates=1, passed=1, decoded=1)
        if mode != "grid":
            raise ValueError(f"unknown automatic mode {mode!r}: use 'box' or 'grid'")
        if chunk_size is None:
            chunk_size = 16 if self.device.type == "cuda" else 1
        if chunk_size < 1 or decode_chunk < 1:
            raise ValueError("chunk_size and decode_chunk must be >= 1")
        pts = to_input_frame(grid_points(grid_size, h, w), feats.original_size, self.model.img_size)
        coords = torch.as_tensor(pts, dtype=torch.float, device=self.device)[:, None, :]
        labels = torch.ones((coords.shape[0], 1), dtype=torch.int, device=self.device)

        ious, embeddings = [], []
        for start in range(0, coords.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            if between_steps is not None:
                between_steps()
            sparse, dense = self.model.prompt_encoder(points=(coords[chunk], labels[chunk]), boxes=None, masks=None)
            iou, mask_embedding = self.model.run_prim(feats.embedding, sparse, dense, fast=self.fast,
                                                      state=feats.decoder_state)
            keep = iou > iou_threshold
            ious.append(iou)
            # Only candidates can be decoded later (``choose_lazily`` decodes prompts over the
            # threshold only); keep just their mask embeddings.
            embeddings.extend(zip((start + keep.nonzero()[:, 0]).tolist(), mask_embedding[keep], strict=True))
        ious = torch.cat(ious)
        candidates = dict(embeddings)
        skips: list[list[torch.Tensor]] = []  # PDMM's image part, computed when the first candidate is decoded

        def decode(batch):
            if not skips:
                skips.append(self._skips(feats, between_steps))
            logits = self.model.pdmm.decode(torch.stack([candidates[i] for i in batch]), skips[0],
                                            between_steps=between_steps)
            return (self._postprocess(logits, feats)[:, 0] > 0).cpu().numpy()

        choice = choose_lazily(ious, decode, iou_threshold=iou_threshold, min_region_area=min_region_area,
                               shape=(h, w), decode_chunk=decode_chunk)
        return AutoResult(mask=choice.mask, iou=choice.iou, candidates=coords.shape[0], passed=choice.passed,
                          decoded=choice.decoded)
