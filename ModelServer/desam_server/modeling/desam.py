"""The DeSAM assembly: a frozen SAM-family encoder, SAM's prompt encoder and mask decoder
(the prompted path), and the trainable DeSAM decoders PRIM + PDMM (the automatic path)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn
from torch.nn import functional as F

from .decoder_fast import MaskDense, mask_decoder_forward
from .pdmm import PDMM
from .prim import PRIM
from .resize import resize_band


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
    original_size: (H, W) of the slice as given.
    """

    embedding: torch.Tensor
    taps: list[torch.Tensor]
    input_size: tuple[int, int]
    original_size: tuple[int, int]
    skips: list[torch.Tensor] | None = field(default=None, repr=False)
    #: Per-slice decoder work shared by every prompt (see ``decoder_fast``), filled lazily.
    decoder_state: dict = field(default_factory=dict, repr=False)


class DeSAM(nn.Module):
    """Keyword-only arguments: the registry name of the encoder, the built submodules and
    the input convention. ``image_encoder`` must return ``(embedding, taps)`` and expose
    ``tap_channels``, ``tap_sizes`` and ``embedding_size``."""

    mask_threshold: float = 0.0
    #: Without autograd, run SAM's mask decoder through ``decoder_fast`` (same results to
    #: float rounding, about 1.6x faster for a click); False: the module's own forward.
    reassociated_decoder: bool = True

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
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None

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

    def dense_pe(self) -> torch.Tensor:
        """``prompt_encoder.get_dense_pe()`` (1 x 256 x E x E), computed once per
        positional-encoding buffer and device instead of on every decoder call."""
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        tag = (gaussian.device, gaussian.data_ptr(), gaussian._version)
        cached = self._dense_pe
        if cached is None or cached[0] != tag:
            with torch.no_grad():
                cached = (tag, self.prompt_encoder.get_dense_pe())
            self._dense_pe = cached
        return cached[1]

    # ---- image side -----------------------------------------------------------------
    def normalize_and_pad(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w on the 0-255 scale (longest side img_size) -> B x 3 x S x S."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised padded input B x 3 x S x S -> (embedding B x 256 x E x E, taps)."""
        return self.image_encoder(x)

    # ---- the automatic (DeSAM) path ---------------------------------------------------
    def image_skips(self, taps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """PDMM's prompt-independent part for one slice; reuse it for every prompt."""
        return self.pdmm.encode_image(taps)

    def desam_decode(
        self,
        embedding: torch.Tensor,
        skips: Sequence[torch.Tensor],
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        state: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PRIM + the prompt-dependent part of PDMM.

        embedding: 1 x 256 x E x E; skips: from ``image_skips``; points: (B x N x 2 coords
        in the padded input frame (x, y), B x N labels); boxes: B x 4 XYXY in that frame.
        state: the slice's ``ImageFeatures.decoder_state``. Returns (iou B, logits
        B x 1 x 4E x 4E).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        iou, mask_embedding = self.prim(embedding, self.dense_pe(), sparse, dense, state=state)
        return iou, self.pdmm.decode(mask_embedding, skips)

    def desam_forward(
        self,
        embedding: torch.Tensor,
        taps: Sequence[torch.Tensor],
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training form: per-sample features (batch B everywhere) -> (iou B, logits)."""
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
        state: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's own decoder: (low-res logits B x C x 4E x 4E, iou B x C). state: the
        slice's ``ImageFeatures.decoder_state`` (work shared by its prompts)."""
        fast = self.reassociated_decoder and not torch.is_grad_enabled()
        factored = None
        if fast and mask_input is not None and state is not None:
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
        if fast:
            return mask_decoder_forward(self.mask_decoder, embedding, self.dense_pe(), sparse, dense,
                                        multimask_output, state)
        return self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def postprocess_logits(
        self, logits: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits B x C x L x L -> B x C x H x W in the original slice frame:
        bilinear to S x S, crop the unpadded h x w region, bilinear to H x W (SAM's
        steps). Bilinear resizing is linear and separable, so the three steps fold into
        one H x L matrix for rows and one W x L matrix for columns, applied band by band
        (``resize.Band``): no S x S intermediate per mask (same values to ~1e-6)."""
        rows = resize_band(logits.shape[-2], self.img_size, input_size[0], original_size[0], logits.device)
        cols = resize_band(logits.shape[-1], self.img_size, input_size[1], original_size[1], logits.device)
        x = logits.float()
        lead = x.shape[:-2]
        x = cols.apply(x.reshape(-1, *x.shape[-2:]).transpose(1, 2)).transpose(1, 2)
        return rows.apply(x).reshape(*lead, rows.out, cols.out).contiguous()
