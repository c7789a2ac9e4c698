"""Shared fixtures: small random DeSAM models and SAM checkpoints the tests write."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_server.modeling import build_desam, get_spec


def make_sam_for(encoder: str):
    """A ``segment_anything.Sam`` with the same architecture as our ``encoder`` entry,
    random weights (seeded), so that its state dict is an official-layout checkpoint."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    spec = get_spec(encoder)
    assert spec.family == "vit"
    torch.manual_seed(0)
    enc_kwargs = dict(spec.make_encoder.keywords)
    enc_kwargs.pop("tap_blocks")
    grid = spec.embedding_size
    img = spec.convention.img_size
    sam = Sam(
        image_encoder=ImageEncoderViT(**enc_kwargs),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(img, img), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=list(spec.convention.pixel_mean), pixel_std=list(spec.convention.pixel_std),
    )
    # Random init leaves SAM's relative-position tables at zero; give them values so the
    # test exercises them.
    with torch.no_grad():
        for name, p in sam.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.02)
    return sam.eval()


@pytest.fixture(scope="session")
def tiny_sam_checkpoint(tmp_path_factory):
    sam = make_sam_for("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth"
    torch.save(sam.state_dict(), path)
    return path, sam


@pytest.fixture(scope="session")
def tiny_model(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    return build_desam("tiny", sam_checkpoint=path)


@pytest.fixture(scope="module")
def scheduler_model():
    """A tiny DeSAM with random weights (seeded), for the scheduler tests."""
    torch.manual_seed(0)
    return build_desam("tiny")


@pytest.fixture(scope="module")
def scheduler_volume():
    """A 12 x 64 x 80 int16 noise volume with a bright block, for the scheduler tests."""
    r = np.random.default_rng(7)
    vol = r.normal(0, 120, size=(12, 64, 80)).astype(np.int16)
    vol[:, 20:40, 30:60] += 200
    return vol


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)


def phantom_slice(h: int = 180, w: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 slice with an elliptical 'organ' and its exact mask."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    mask = ((yy - h * 0.5) / (h * 0.25)) ** 2 + ((xx - w * 0.55) / (w * 0.2)) ** 2 <= 1
    image = np.full((h, w), -1000, np.int16)
    body = ((yy - h * 0.5) / (h * 0.45)) ** 2 + ((xx - w * 0.5) / (w * 0.45)) ** 2 <= 1
    image[body] = 0
    image[mask] = 60
    image = (image + r.normal(0, 10, size=image.shape)).astype(np.int16)
    return image, mask


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * np.logical_and(a, b).sum() / denom
