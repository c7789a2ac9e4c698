"""The DeSAM assembly: a frozen SAM-family encoder, SAM's prompt encoder and mask decoder
(the prompted path), and the trainable DeSAM decoders PRIM + PDMM (the automatic path)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn
from torch.nn import functional as F

from .decoder_fast import MaskDense, mask_decoder_forward, transformer_constants
from .decoder_state import ModelConstants, SliceDecoderState, TransformerConstants, UpscaleProjection
from .decoder_upscale import upscale_projection
from .fast_path import FastPath
from .pdmm import PDMM
from .prim import PRIM


@dataclass(frozen=True)
class InputConvention:
    """How an 8-bit RGB slice becomes encoder input.

    img_size: side of the square encoder input; the slice is resized so its longest
      side is img_size, normalised as (x - pixel_mean) / pixel_std on the 0-255 scale,
      and padded bottom/right with zeros.
    supports_points: False for encoders fine-tuned with box prompts only (LiteMedSAM).
    """

    name: str
    img_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    supports_points: bool = True

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "img_size": self.img_size,
            "pixel_mean": list(self.pixel_mean),
            "pixel_std": list(self.pixel_std),
            "supports_points": self.supports_points,
        }


SAM_CONVENTION_1024 = InputConvention(
    name="sam-meanstd", img_size=1024,
    pixel_mean=(123.675, 116.28, 103.53), pixel_std=(58.395, 57.12, 57.375),
)


@dataclass
class ImageFeatures:
    """Encoder output for one slice (batch 1).

    embedding: 1 x 256 x E x E neck output; taps: three 1 x C_i x S_i x S_i maps, shallow
    to deep; input_size: (h, w) of the resized slice inside the padded input;
    original_size: (H, W) of the slice as given; decoder_state: decoder work shared by
    every prompt on this slice (``decoder_state.SliceDecoderState``), filled by the
    inference calls of the model that uses these features.
    """

    embedding: torch.Tensor
    taps: list[torch.Tensor]
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    decoder_state: SliceDecoderState = field(default_factory=SliceDecoderState, repr=False)


StepCallback = Callable[[], None]


class DeSAM(nn.Module):
    """Keyword-only arguments: the registry name of the encoder, the built submodules and
    the input convention. ``image_encoder`` must return ``(embedding, taps)`` from
    ``forward(x, between_steps=None)`` and expose ``tap_channels``, ``tap_sizes`` and
    ``embedding_size``.

    Decoder calls take ``fast``: None runs the modules as written (training, references);
    a ``FastPath`` runs the inference fast path (``decoder_fast``), which is refused under
    autograd. Values derived from the weights for the fast path are held in a
    ``ModelConstants`` of the current weights *generation*; call ``weights_changed()``
    after changing weights in place (an optimizer step; checkpoint loading, ``to()`` and
    ``load_state_dict`` on this model call it themselves)."""

    mask_threshold: float = 0.0

    def __init__(
        self,
        *,
        encoder_name: str,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        prim: PRIM,
        pdmm: PDMM,
        convention: InputConvention,
        tap_indices: Sequence[int],
    ) -> None:
        super().__init__()
        self.encoder_name = encoder_name
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.prim = prim
        self.pdmm = pdmm
        self.convention = convention
        self.tap_indices = tuple(int(i) for i in tap_indices)
        self.register_buffer("pixel_mean", torch.tensor(convention.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(convention.pixel_std).view(-1, 1, 1), False)
        # Provenance, filled by the loaders: sha256 of the SAM-family checkpoint the encoder
        # came from (None for random weights) and the metadata of a loaded DeSAM decoder.
        self.encoder_weights_sha256: str | None = None
        self.decoder_metadata: dict | None = None
        self._constants = ModelConstants()

    # ---- properties -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        return self.convention.img_size

    @property
    def has_trained_decoder(self) -> bool:
        """True once PRIM + PDMM weights were loaded from a DeSAM decoder file."""
        return self.decoder_metadata is not None

    def decoder_modules(self) -> dict[str, nn.Module]:
        return {"prim": self.prim, "pdmm": self.pdmm}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.decoder_modules().values() for p in module.parameters()]

    def freeze_frozen_parts(self) -> None:
        """Encoder, prompt encoder and SAM's mask decoder never train in DeSAM."""
        for module in (self.image_encoder, self.prompt_encoder, self.mask_decoder):
            for p in module.parameters():
                p.requires_grad_(False)

    # ---- derived state ----------------------------------------------------------------
    @property
    def generation(self) -> int:
        """Number of the current weights generation (unique in the process)."""
        return self._constants.generation

    def weights_changed(self) -> None:
        """Forget everything derived from the weights: the fast path's constants now, and
        each slice's decoder state when it is next used by this model. Call it after
        changing any weight in place (an optimizer step)."""
        self._constants = ModelConstants()

    def _apply(self, fn, recurse=True):
        # to(), cuda(), float(), ...: new tensors, so new derived values.
        result = super()._apply(fn, recurse)
        self.weights_changed()
        return result

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.weights_changed()
        return result

    def slice_state(self, features: ImageFeatures) -> SliceDecoderState:
        """The features' decoder state, cleared if another weights generation filled it."""
        return features.decoder_state.bind(self.generation)

    def dense_pe(self) -> torch.Tensor:
        """``prompt_encoder.get_dense_pe()`` (1 x 256 x E x E), computed once per weights
        generation instead of on every decoder call (a normal tensor even when first
        asked for under inference mode, so that training can use it too)."""
        constants = self._constants
        if constants.dense_pe is None:
            with torch.inference_mode(False), torch.no_grad():
                constants.dense_pe = self.prompt_encoder.get_dense_pe()
        return constants.dense_pe

    def _sam_constants(self) -> tuple[TransformerConstants, UpscaleProjection]:
        constants = self._constants
        if constants.sam is None:
            constants.sam = transformer_constants(self.mask_decoder.transformer, self.dense_pe())
            constants.sam_upscale = upscale_projection(self.mask_decoder)
        return constants.sam, constants.sam_upscale

    def _prim_constants(self) -> TransformerConstants:
        constants = self._constants
        if constants.prim is None:
            constants.prim = transformer_constants(self.prim.transformer, self.dense_pe())
        return constants.prim

    @staticmethod
    def _check_inference(fast: FastPath | None) -> None:
        if fast is not None and torch.is_grad_enabled():
            raise RuntimeError("the decoders' fast path is for inference: call it under torch.inference_mode() "
                               "or torch.no_grad(), or pass fast=None to run the modules (training)")

    # ---- image side -----------------------------------------------------------------
    def normalize_and_pad(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w on the 0-255 scale (longest side img_size) -> B x 3 x S x S."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def encode(self, x: torch.Tensor, *, between_steps: StepCallback | None = None,
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised padded input B x 3 x S x S -> (embedding B x 256 x E x E, taps).
        between_steps: called between the encoder's steps (blocks and their halves): a
        caller's chance to run other work or to stop the pass by raising."""
        return self.image_encoder(x, between_steps=between_steps)

    # ---- the automatic (DeSAM) path ---------------------------------------------------
    def image_skips(self, taps: Sequence[torch.Tensor], *,
                    between_steps: StepCallback | None = None) -> list[torch.Tensor]:
        """PDMM's prompt-independent part for one slice; reuse it for every prompt."""
        return self.pdmm.encode_image(taps, between_steps=between_steps)

    def slice_skips(self, features: ImageFeatures, *, between_steps: StepCallback | None = None,
                    ) -> list[torch.Tensor]:
        """``image_skips`` of the slice's taps, kept in its decoder state (per weights
        generation)."""
        state = self.slice_state(features)
        if state.pdmm_skips is None:
            state.pdmm_skips = self.image_skips(features.taps, between_steps=between_steps)
        return state.pdmm_skips

    def run_prim(self, embedding: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor, *,
                 fast: FastPath | None = None, state: SliceDecoderState | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """PRIM on prompt embeddings: (iou B, mask embedding B x 256 x E x E). fast: None
        runs ``PRIM.forward``; a ``FastPath`` ``PRIM.infer`` with the slice's ``state``."""
        self._check_inference(fast)
        if fast is None or not fast.reassociate:
            return self.prim(embedding, self.dense_pe(), sparse, dense)
        cache = state.bind(self.generation).prim if state is not None and fast.slice_cache else None
        return self.prim.infer(embedding, sparse, dense, constants=self._prim_constants(), cache=cache)

    def desam_decode(
        self,
        embedding: torch.Tensor,
        skips: Sequence[torch.Tensor],
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        fast: FastPath | None = None,
        state: SliceDecoderState | None = None,
        between_steps: StepCallback | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PRIM + the prompt-dependent part of PDMM.

        embedding: 1 x 256 x E x E; skips: from ``image_skips``; points: (B x N x 2 coords
        in the padded input frame (x, y), B x N labels); boxes: B x 4 XYXY in that frame.
        fast / state: see ``run_prim``. Returns (iou B, logits B x 1 x 4E x 4E).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        iou, mask_embedding = self.run_prim(embedding, sparse, dense, fast=fast, state=state)
        return iou, self.pdmm.decode(mask_embedding, skips, between_steps=between_steps)

    def desam_forward(
        self,
        embedding: torch.Tensor,
        taps: Sequence[torch.Tensor],
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training form: per-sample features (batch B everywhere) -> (iou B, logits),
        through the modules as written."""
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        iou, mask_embedding = self.prim(embedding, self.dense_pe(), sparse, dense)
        return iou, self.pdmm(mask_embedding, taps)

    # ---- the prompted (SAM) path -------------------------------------------------------
    def sam_decode(
        self,
        embedding: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
        multimask_output: bool,
        fast: FastPath | None = None,
        state: SliceDecoderState | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's own decoder: (low-res logits B x C x 4E x 4E, iou B x C). fast: None runs
        ``mask_decoder`` as written; a ``FastPath`` runs ``decoder_fast`` with the slice's
        ``state`` (work shared by its prompts)."""
        self._check_inference(fast)
        if fast is None or not fast.reassociate:
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
            return self.mask_decoder(image_embeddings=embedding, image_pe=self.dense_pe(),
                                     sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                     multimask_output=multimask_output)
        cache = state.bind(self.generation).sam if state is not None and fast.slice_cache else None
        factored = None
        if fast.factored_mask_input and mask_input is not None and cache is not None:
            # Kept as a rank-16 term so the slice's cached first block serves refinements too.
            factored = MaskDense.of(self.prompt_encoder.mask_downscaling, mask_input)
        if factored is not None:
            if points is None and boxes is None:
                sparse = mask_input.new_empty(mask_input.shape[0], 0, self.prompt_encoder.embed_dim)
            else:
                sparse, _ = self.prompt_encoder(points=points, boxes=boxes, masks=None)
            dense = factored
        else:
            sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        constants, projection = self._sam_constants()
        return mask_decoder_forward(self.mask_decoder, constants, projection, embedding, sparse, dense,
                                    multimask_output, cache=cache, matrix_upscaling=fast.matrix_upscaling)

    def postprocess_logits(
        self, logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int],
    ) -> torch.Tensor:
        """Low-res logits B x C x L x L -> B x C x H x W in the original slice frame, as SAM
        does it: bilinear to S x S, crop the unpadded h x w region, bilinear to H x W."""
        return postprocess_logits(logits, input_size, original_size, img_size=self.img_size)


def postprocess_logits(logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], *,
                       img_size: int) -> torch.Tensor:
    """Low-res logits B x C x L x L -> B x C x H x W (float32) in the original slice frame,
    as SAM does it: bilinear to img_size x img_size, crop the unpadded h x w = input_size
    region, bilinear to H x W = original_size. Shared by every model holding SAM's mask
    decoder (DeSAM, SAM-Mix)."""
    x = F.interpolate(logits.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, original_size, mode="bilinear", align_corners=False)
