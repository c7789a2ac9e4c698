"""Builders and the encoder registry. A builder never downloads anything: it takes
optional local checkpoint paths and otherwise returns randomly initialised weights."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from os import PathLike

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from .desam import SAM_CONVENTION_1024, DeSAM, InputConvention
from .encoder_taps import TappedImageEncoderViT
from .pdmm import PDMM
from .prim import PRIM

PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class EncoderSpec:
    """What DeSAM needs to know about one encoder before building it.

    tap_indices: ViT block indices (or TinyViT stage indices) of the three taps;
    tap_channels / tap_sizes: their widths and spatial sides, shallow to deep;
    weights: catalog name of the default pretrained checkpoint, if one exists.
    """

    name: str
    family: str
    make_encoder: Callable[[], nn.Module]
    convention: InputConvention
    embedding_size: int
    tap_indices: tuple[int, int, int]
    tap_channels: tuple[int, int, int]
    tap_sizes: tuple[int, int, int]
    weights: str | None = None


def _vit(embed_dim: int, depth: int, heads: int, global_blocks: tuple[int, ...], *,
         img_size: int = 1024, patch: int = 16, window: int = 14) -> Callable[[], nn.Module]:
    return partial(
        TappedImageEncoderViT,
        tap_blocks=global_blocks[:3],
        depth=depth,
        embed_dim=embed_dim,
        img_size=img_size,
        mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_heads=heads,
        patch_size=patch,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=global_blocks,
        window_size=window,
        out_chans=PROMPT_EMBED_DIM,
    )


def _vit_spec(name: str, embed_dim: int, depth: int, heads: int, global_blocks: tuple[int, ...],
              *, weights: str | None, img_size: int = 1024, window: int = 14) -> EncoderSpec:
    grid = img_size // 16
    convention = SAM_CONVENTION_1024 if img_size == 1024 else InputConvention(
        name="sam-meanstd", img_size=img_size,
        pixel_mean=SAM_CONVENTION_1024.pixel_mean, pixel_std=SAM_CONVENTION_1024.pixel_std,
    )
    return EncoderSpec(
        name=name, family="vit",
        make_encoder=_vit(embed_dim, depth, heads, global_blocks, img_size=img_size, window=window),
        convention=convention, embedding_size=grid,
        tap_indices=global_blocks[:3], tap_channels=(embed_dim,) * 3, tap_sizes=(grid,) * 3,
        weights=weights,
    )


def _mobile_sam_encoder() -> nn.Module:
    from .tiny_vit import mobile_sam_encoder

    return mobile_sam_encoder()


def _lite_medsam_encoder() -> nn.Module:
    from .tiny_vit import lite_medsam_encoder

    return lite_medsam_encoder()


ENCODERS: dict[str, EncoderSpec] = {
    "vit_h": _vit_spec("vit_h", 1280, 32, 16, (7, 15, 23, 31), weights="sam_vit_h"),
    "vit_l": _vit_spec("vit_l", 1024, 24, 16, (5, 11, 17, 23), weights="sam_vit_l"),
    "vit_b": _vit_spec("vit_b", 768, 12, 12, (2, 5, 8, 11), weights="sam_vit_b"),
    "mobile_sam": EncoderSpec(
        name="mobile_sam", family="tiny_vit", make_encoder=_mobile_sam_encoder,
        convention=SAM_CONVENTION_1024, embedding_size=64,
        tap_indices=(0, 1, 2), tap_channels=(128, 160, 320), tap_sizes=(128, 64, 64),
        weights="mobile_sam",
    ),
    "lite_medsam": EncoderSpec(
        name="lite_medsam", family="tiny_vit", make_encoder=_lite_medsam_encoder,
        convention=InputConvention(
            name="unit-range", img_size=256, pixel_mean=(0.0, 0.0, 0.0),
            pixel_std=(255.0, 255.0, 255.0), supports_points=False,
        ),
        embedding_size=64,
        tap_indices=(0, 1, 2), tap_channels=(128, 160, 320), tap_sizes=(128, 64, 64),
        weights="lite_medsam",
    ),
    # A small ViT of the same segment_anything classes, for tests: 256 px input, 16 x 16
    # token grid, windowed and global blocks, real-sized prompt encoder and decoders.
    "tiny": _vit_spec("tiny", 32, 8, 2, (1, 3, 5, 7), weights=None, img_size=256, window=4),
}


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}") from None


def build_decoders(name: str, *, fuse_mask_embedding: bool = True) -> tuple[PRIM, PDMM]:
    """PRIM and PDMM for an encoder, without building the encoder itself.
    fuse_mask_embedding: see ``PDMM`` (False only for the ablation)."""
    spec = get_spec(name)
    prim = PRIM(transformer_dim=PROMPT_EMBED_DIM)
    pdmm = PDMM(
        tap_channels=spec.tap_channels, tap_sizes=spec.tap_sizes,
        embedding_size=spec.embedding_size, embed_dim=PROMPT_EMBED_DIM,
        fuse_mask_embedding=fuse_mask_embedding,
    )
    return prim, pdmm


def without_fusion(model: DeSAM) -> DeSAM:
    """The ablation model "PDMM without PRIM's mask-embedding fusion" beside ``model``: a
    new DeSAM that shares ``model``'s frozen parts (encoder, prompt encoder, SAM's mask
    decoder: the same module objects), with a copy of its PRIM and a new randomly
    initialised PDMM built with ``fuse_mask_embedding=False``, on ``model``'s device, in
    eval mode. ``model`` itself is not changed."""
    _, pdmm = build_decoders(model.encoder_name, fuse_mask_embedding=False)
    variant = DeSAM(
        encoder_name=model.encoder_name, image_encoder=model.image_encoder, prompt_encoder=model.prompt_encoder,
        mask_decoder=model.mask_decoder, prim=copy.deepcopy(model.prim), pdmm=pdmm.to(model.device),
        convention=model.convention, tap_indices=model.tap_indices,
    ).to(model.device)
    variant.encoder_weights_sha256 = model.encoder_weights_sha256
    variant.freeze_frozen_parts()
    return variant.eval()


def build_desam(
    encoder: str,
    sam_checkpoint: str | PathLike | None = None,
    decoder_checkpoint: str | PathLike | None = None,
    *,
    sam_checkpoint_sha256: str | None = None,
) -> DeSAM:
    """Build DeSAM for a registry encoder name, in eval mode, with frozen encoder parts.

    sam_checkpoint: a SAM-family checkpoint in the official layout (image_encoder.*,
      prompt_encoder.*, mask_decoder.*), loaded strictly; PRIM starts from its mask decoder.
      Without it every weight is random.
    decoder_checkpoint: a DeSAM decoder file (PRIM + PDMM) written by ``save_decoder``.
    sam_checkpoint_sha256: when given, the checkpoint file must have this hash.
    """
    from .checkpoint import load_decoder, load_sam_checkpoint

    spec = get_spec(encoder)
    image_encoder = spec.make_encoder()
    if tuple(image_encoder.tap_channels) != spec.tap_channels or tuple(image_encoder.tap_sizes) != spec.tap_sizes:
        raise RuntimeError(f"encoder {encoder} taps disagree with its registry entry")
    grid = spec.embedding_size
    img = spec.convention.img_size
    prompt_encoder = PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(grid, grid),
        input_image_size=(img, img), mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256,
    )
    prim, pdmm = build_decoders(encoder)
    model = DeSAM(
        encoder_name=spec.name, image_encoder=image_encoder, prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder, prim=prim, pdmm=pdmm, convention=spec.convention,
        tap_indices=spec.tap_indices,
    )
    if sam_checkpoint is not None:
        load_sam_checkpoint(model, sam_checkpoint, expected_sha256=sam_checkpoint_sha256)
    model.prim.load_from_sam_decoder(model.mask_decoder)
    if decoder_checkpoint is not None:
        load_decoder(model, decoder_checkpoint)
    model.freeze_frozen_parts()
    model.eval()
    return model


@torch.no_grad()
def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
