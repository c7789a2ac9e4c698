"""Building a DB-SAM encoder, and its weights file.

A DB-SAM weights file holds only DB-SAM's trainable parts (``adapters.*``,
``conv_branch.*`` with its batch-norm statistics, ``cross_attention.*``, ``fusion.*``),
never the frozen SAM encoder, as safetensors (floating tensors in float32, others as
they are) with one metadata entry ``dbsam`` whose value is JSON:

    format "dbsam-encoder", format_version 1, encoder (registry name),
    encoder_weights_sha256 (the SAM checkpoint's sha256, null for random weights),
    hyper_parameters (those that fix the shapes, and the adapters' drop-path rate),
    dbsam_weights_sha256 (sha256 over the tensors: a key for caches of DB-SAM features),
    metadata (the caller's, e.g. a training summary); and, for the ablations only, parts
    (the trainable parts present; absent means all four, so the full model's files are
    the same as before the ablations existed).

Files are written atomically; loading is strict (every key, every shape).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from ..atomic import atomic_write_bytes
from .checkpoint import CheckpointError, _check_keys, read_metadata, read_safetensors
from .dbsam_encoder import TRAINABLE_PARTS, DBSAMEncoder
from .dbsam_parameters import dbsam_layout
from .desam import DeSAM

DBSAM_FORMAT = "dbsam-encoder"
DBSAM_FORMAT_VERSION = 1
METADATA_KEY = "dbsam"
#: Hyper-parameters that must agree between a file and the encoder it loads into.
SHAPE_HYPER_PARAMETERS = ("se_reduction", "num_points", "ffn_ratio", "fusion_reduction")


def build_dbsam_encoder(model_or_encoder: DeSAM | nn.Module, *, encoder_name: str | None = None,
                        encoder_weights_sha256: str | None = None, **hyper_parameters: Any) -> DBSAMEncoder:
    """A DB-SAM encoder around a DeSAM model's image encoder (name and weights hash taken
    from the model) or around a bare, frozen registry encoder (``encoder_name`` required;
    ``encoder_weights_sha256`` if known). The encoder is shared, not copied (see
    ``dbsam_encoder``); ``hyper_parameters`` are ``DBSAMEncoder``'s keyword arguments.
    Returned in training mode, on the encoder's device."""
    if isinstance(model_or_encoder, DeSAM):
        if encoder_name not in (None, model_or_encoder.encoder_name):
            raise ValueError(f"encoder_name {encoder_name!r} differs from the model's "
                             f"{model_or_encoder.encoder_name!r}")
        encoder = model_or_encoder.image_encoder
        encoder_name = model_or_encoder.encoder_name
        encoder_weights_sha256 = encoder_weights_sha256 or model_or_encoder.encoder_weights_sha256
    else:
        encoder = model_or_encoder
        if encoder_name is None:
            raise ValueError("a bare encoder needs its registry name (encoder_name)")
    device = next(encoder.parameters()).device
    dbsam = DBSAMEncoder(encoder, dbsam_layout(encoder_name), encoder_weights_sha256=encoder_weights_sha256,
                         **hyper_parameters)
    for module in dbsam.trainable_modules().values():
        module.to(device)
    return dbsam.train()


def dbsam_state_dict(encoder: DBSAMEncoder) -> dict[str, torch.Tensor]:
    """``part.key`` -> CPU tensor (floating ones in float32) of DB-SAM's trainable parts."""
    state = {}
    for name, module in encoder.trainable_modules().items():
        for key, value in module.state_dict().items():
            value = value.detach().to("cpu")
            if value.is_floating_point():
                value = value.to(torch.float32)
            state[f"{name}.{key}"] = value.contiguous()
    return state


def dbsam_weights_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the tensors in key order: each key, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_dbsam(encoder: DBSAMEncoder, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None,
               ) -> dict[str, Any]:
    """Write DB-SAM's trainable parts and their metadata to ``path`` atomically; returns
    the metadata (with ``dbsam_weights_sha256``)."""
    state = dbsam_state_dict(encoder)
    meta = {
        "format": DBSAM_FORMAT,
        "format_version": DBSAM_FORMAT_VERSION,
        "encoder": encoder.encoder_name,
        "encoder_weights_sha256": encoder.encoder_weights_sha256,
        "hyper_parameters": dict(encoder.hyper_parameters),
        "dbsam_weights_sha256": dbsam_weights_sha256(state),
        "metadata": dict(metadata or {}),
    }
    if encoder.parts != TRAINABLE_PARTS:
        meta["parts"] = list(encoder.parts)
    data = st_save(state, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    return meta


def read_dbsam(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a DB-SAM weights file's tensors and metadata, checking container, format and
    version (not yet the fit to an encoder)."""
    path = Path(path)
    tensors, entries = read_safetensors(path, "DB-SAM weights file")
    meta = read_metadata(path, entries, "DB-SAM weights file", METADATA_KEY)
    if meta.get("format") != DBSAM_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {DBSAM_FORMAT!r}")
    if meta.get("format_version") != DBSAM_FORMAT_VERSION:
        raise CheckpointError(f"{path}: DB-SAM format version {meta.get('format_version')} is not supported "
                              f"(this build reads version {DBSAM_FORMAT_VERSION})")
    return tensors, meta


def load_dbsam(encoder: DBSAMEncoder, path: str | os.PathLike) -> dict[str, Any]:
    """Load DB-SAM's trainable parts from ``path`` strictly, after checking that the file
    was made for this encoder (registry name, frozen weights hash, shape hyper-parameters);
    returns the file's metadata. Refused files leave the encoder unchanged."""
    path = Path(path)
    tensors, meta = read_dbsam(path)
    if meta.get("encoder") != encoder.encoder_name:
        raise CheckpointError(f"{path}: DB-SAM weights were trained for encoder {meta.get('encoder')!r}, "
                              f"this encoder is {encoder.encoder_name!r}")
    theirs, ours = meta.get("encoder_weights_sha256"), encoder.encoder_weights_sha256
    if theirs != ours:
        raise CheckpointError(f"{path}: DB-SAM weights were trained on encoder weights {theirs or 'random (none)'}, "
                              f"this encoder's weights are {ours or 'random (none)'}")
    parts = tuple(meta.get("parts", TRAINABLE_PARTS))
    if parts != encoder.parts:
        raise CheckpointError(f"{path}: DB-SAM weights hold the parts {', '.join(parts)}; this encoder has "
                              f"{', '.join(encoder.parts)}")
    hyper = meta.get("hyper_parameters", {})
    differ = [k for k in SHAPE_HYPER_PARAMETERS if hyper.get(k) != encoder.hyper_parameters[k]]
    if differ:
        raise CheckpointError(f"{path}: hyper-parameters differ: " + ", ".join(
            f"{k} {hyper.get(k)} in the file, {encoder.hyper_parameters[k]} here" for k in differ))
    expected = dbsam_state_dict(encoder)
    _check_keys(path, set(expected), set(tensors))
    wrong = [k for k, v in expected.items() if tensors[k].shape != v.shape or tensors[k].dtype != v.dtype]
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} tensors of the wrong shape or type: " + ", ".join(
            f"{k} {tuple(tensors[k].shape)} {tensors[k].dtype} (expected {tuple(expected[k].shape)} "
            f"{expected[k].dtype})" for k in sorted(wrong)[:8]))
    for name, module in encoder.trainable_modules().items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    return meta
