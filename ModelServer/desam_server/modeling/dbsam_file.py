"""The trained DB-SAM model's file: one safetensors holding DB-SAM's encoder blocks and its
SAM mask decoder, never the frozen base encoder or the prompt encoder.

Tensors: ``encoder.<part>.<key>`` (``dbsam_checkpoint.dbsam_state_dict``: adapters,
convolution branch with its batch-norm statistics, cross-attention, fusion; the parts
present) and ``mask_decoder.<key>``; floating tensors in float32. Metadata: the decoder
files' container (one entry ``desam``, JSON; ``checkpoint.read_decoder`` and so the
service's decoder registry refuse it by its format), with:

- format, format_version: ``"dbsam-model"``, 1;
- encoder, encoder_weights_sha256: the base's registry name (``mobile_sam``, ``vit_b``,
  ...) and SAM checkpoint hash (null: random weights); input: its input convention;
- structure, training: the structure's name and the training record;
- dbsam: ``parts``, ``hyper_parameters``, ``encoder_name`` (e.g. ``mobile_sam+dbsam``),
  ``blocks_sha256`` (over the ``encoder.*`` tensors), ``features_sha256`` (the model's
  ``encoder_weights_sha256``: its feature-cache identity);
- weights_sha256: sha256 over all tensors (key, dtype, shape, bytes), checked on reading.

Written atomically; read strictly: another format (a DB-SAM encoder weights file, a
DeSAM decoder, ...), another version, another base encoder or base weights, other parts
or shape hyper-parameters, missing or unexpected keys, tensors of another shape or type,
tensors that do not match the recorded hash: refused with the reason, the model left
unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ..atomic import atomic_write_bytes
from .checkpoint import DECODER_FORMAT, OTHER_FORMATS, CheckpointError, _check_keys, read_metadata, read_safetensors
from .dbsam_checkpoint import DBSAM_FORMAT, SHAPE_HYPER_PARAMETERS, dbsam_state_dict, dbsam_weights_sha256
from .dbsam_model import DBSAM

__all__ = ["DBSAM_MODEL_FORMAT", "DBSAM_MODEL_FORMAT_VERSION", "save_dbsam_model", "read_dbsam_model",
           "load_dbsam_model", "dbsam_model_state_dict", "model_options"]

DBSAM_MODEL_FORMAT = "dbsam-model"
DBSAM_MODEL_FORMAT_VERSION = 1
METADATA_KEY = "desam"


def dbsam_model_state_dict(model: DBSAM) -> dict[str, torch.Tensor]:
    state = {f"encoder.{k}": v for k, v in dbsam_state_dict(model.dbsam).items()}
    for key, value in model.mask_decoder.state_dict().items():
        state[f"mask_decoder.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return state


def save_dbsam_model(model: DBSAM, path: str | os.PathLike, *, structure: str,
                     training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the model's trained parts and metadata to ``path`` atomically; returns the
    metadata."""
    if not structure or not structure.strip():
        raise ValueError("a DB-SAM model file needs a structure name")
    state = dbsam_model_state_dict(model)
    blocks = {k: v for k, v in state.items() if k.startswith("encoder.")}
    meta = {
        "format": DBSAM_MODEL_FORMAT,
        "format_version": DBSAM_MODEL_FORMAT_VERSION,
        "encoder": model.base_encoder_name,
        "encoder_weights_sha256": model.base_encoder_weights_sha256,
        "input": model.convention.to_json(),
        "structure": structure.strip(),
        "training": dict(training or {}),
        "dbsam": {"parts": list(model.parts), "hyper_parameters": dict(model.dbsam.hyper_parameters),
                  "encoder_name": model.encoder_name, "blocks_sha256": dbsam_weights_sha256(blocks),
                  "features_sha256": model.encoder_weights_sha256},
        "weights_sha256": dbsam_weights_sha256(state),
    }
    data = st_save(state, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    return meta


def read_dbsam_model(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A DB-SAM model file's tensors and metadata, after checking container, format,
    version and the recorded hash (not yet the fit to a model)."""
    path = Path(path)
    tensors, entries = read_safetensors(path, "DB-SAM model file")
    if METADATA_KEY not in entries and "dbsam" in entries:
        raise CheckpointError(f"{path}: this is a DB-SAM encoder weights file ({DBSAM_FORMAT!r}: the encoder "
                              f"blocks alone, no mask decoder), not a {DBSAM_MODEL_FORMAT!r} file")
    meta = read_metadata(path, entries, "DB-SAM model file", METADATA_KEY)
    found = meta.get("format")
    if found != DBSAM_MODEL_FORMAT:
        what = {DECODER_FORMAT: "a DeSAM decoder", **OTHER_FORMATS}.get(found)
        raise CheckpointError(f"{path}: format {found!r}{f' ({what})' if what else ''} is not "
                              f"{DBSAM_MODEL_FORMAT!r}")
    if meta.get("format_version") != DBSAM_MODEL_FORMAT_VERSION:
        raise CheckpointError(f"{path}: DB-SAM model format version {meta.get('format_version')} is not supported "
                              f"(this build reads version {DBSAM_MODEL_FORMAT_VERSION})")
    if meta.get("weights_sha256") != dbsam_weights_sha256(tensors):
        raise CheckpointError(f"{path}: the tensors do not match the file's recorded weights_sha256 (changed or "
                              "corrupt)")
    return tensors, meta


def model_options(meta: dict[str, Any]) -> dict[str, Any]:
    """``build_dbsam_model``'s keyword arguments for the model a file was written from
    (ablation switches and hyper-parameters)."""
    dbsam = meta.get("dbsam") or {}
    parts = tuple(dbsam.get("parts", ()))
    return {"with_branch": "conv_branch" in parts, "with_fusion": "fusion" in parts,
            **dict(dbsam.get("hyper_parameters", {}))}


def load_dbsam_model(model: DBSAM, path: str | os.PathLike) -> dict[str, Any]:
    """Load a file written by ``save_dbsam_model`` into ``model`` strictly, after checking
    that it was made for it (base encoder and weights, parts, shape hyper-parameters,
    every key and shape); returns the metadata. A refused file leaves the model unchanged."""
    path = Path(path)
    tensors, meta = read_dbsam_model(path)
    if meta.get("encoder") != model.base_encoder_name:
        raise CheckpointError(f"{path}: DB-SAM model trained on encoder {meta.get('encoder')!r}, this model's base "
                              f"is {model.base_encoder_name!r}")
    theirs, ours = meta.get("encoder_weights_sha256"), model.base_encoder_weights_sha256
    if theirs != ours:
        raise CheckpointError(f"{path}: DB-SAM model trained on encoder weights {theirs or 'random (none)'}, this "
                              f"model's base weights are {ours or 'random (none)'}")
    dbsam = meta.get("dbsam") or {}
    parts = tuple(dbsam.get("parts", ()))
    if parts != model.parts:
        raise CheckpointError(f"{path}: the file holds the DB-SAM parts {', '.join(parts) or 'none'}; this model "
                              f"has {', '.join(model.parts)}")
    hyper, ours_hp = dbsam.get("hyper_parameters", {}), model.dbsam.hyper_parameters
    differ = [k for k in SHAPE_HYPER_PARAMETERS if hyper.get(k) != ours_hp[k]]
    if differ:
        raise CheckpointError(f"{path}: hyper-parameters differ: " + ", ".join(
            f"{k} {hyper.get(k)} in the file, {ours_hp[k]} here" for k in differ))
    expected = dbsam_model_state_dict(model)
    _check_keys(path, set(expected), set(tensors))
    wrong = sorted(k for k, v in expected.items() if tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)
    if wrong:
        raise CheckpointError(f"{path}: {len(wrong)} tensors of the wrong shape or type: " + ", ".join(
            f"{k} {tuple(tensors[k].shape)} {tensors[k].dtype} (expected {tuple(expected[k].shape)} "
            f"{expected[k].dtype})" for k in wrong[:8]))
    for name, module in model.trainable_modules().items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    model.weights_changed()
    return meta
