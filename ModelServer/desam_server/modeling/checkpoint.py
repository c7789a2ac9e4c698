"""Checkpoint files: SAM-family checkpoints (read strictly) and DeSAM decoder files.

A DeSAM decoder file holds PRIM + PDMM only (never the encoder) as safetensors, with one
metadata entry ``desam`` whose value is JSON: format, format version, encoder name and
weights hash, tap indices and widths, input convention, structure name, training summary.

Other model families' trained parts (``training.family``) are written in the same
container with a format name of their own (``save_modules`` / ``load_modules``), so that
the service, which reads ``desam-decoder`` files only, refuses them with a clear message:
``sam-mask-decoder`` (SAM's own mask decoder fine-tuned) and ``desam-decoder-no-fusion``
(the ablation PDMM without PRIM's mask-embedding fusion); DB-SAM's model files
(``dbsam_file``, ``dbsam-model``) share the container too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..atomic import atomic_write_bytes
from ..hashing import sha256_file
from .desam import DeSAM

DECODER_FORMAT = "desam-decoder"
DECODER_FORMAT_VERSION = 1
#: Formats of other families' files, and why the service cannot serve them.
OTHER_FORMATS = {
    "sam-mask-decoder": "SAM's own mask decoder fine-tuned (an evidence model, not a DeSAM decoder)",
    "desam-decoder-no-fusion": "the ablation PDMM without PRIM's mask-embedding fusion (an evidence model)",
    "dbsam-model": "a DB-SAM model: its own encoder blocks and SAM's mask decoder, served by engine.dbsam_serving",
    "sam-mix": "a SAM-Mix model (classifier + LoRA + mask decoder; engine.sammix_serving.load_servable)",
}
#: Formats of files the service serves, by model family (``api.decoders.LoadedDecoder.family``):
#: DeSAM decoders, DB-SAM models (``modeling.dbsam_file``), SAM-Mix models (``engine.sammix_file``).
SERVED_FORMATS = {DECODER_FORMAT: "desam", "dbsam-model": "dbsam", "sam-mix": "sammix"}
SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or does not fit the model."""


def _describe_keys(label: str, keys: set[str]) -> str:
    shown = ", ".join(sorted(keys)[:8])
    more = f" (+{len(keys) - 8} more)" if len(keys) > 8 else ""
    return f"{len(keys)} {label}: {shown}{more}"


def _check_keys(path: Path, expected: set[str], found: set[str]) -> None:
    missing, unexpected = expected - found, found - expected
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(_describe_keys("missing keys", missing))
        if unexpected:
            parts.append(_describe_keys("unexpected keys", unexpected))
        raise CheckpointError(f"{path}: does not match the model: " + "; ".join(parts))


def load_sam_checkpoint(model: DeSAM, path: str | os.PathLike, *, expected_sha256: str | None = None) -> None:
    """Load a SAM-family checkpoint (official layout) strictly into the model's encoder,
    prompt encoder and SAM mask decoder. Records the file's sha256 on the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: SAM checkpoint not found")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise CheckpointError(
            f"{path}: sha256 {digest} does not match the expected {expected_sha256} "
            "(incomplete download or a different file)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"{path}: cannot read SAM checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors")
    expected = {k for k in model.state_dict() if k.split(".", 1)[0] in SAM_PARTS}
    _check_keys(path, expected, set(state))
    for part in SAM_PARTS:
        prefix = part + "."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        try:
            getattr(model, part).load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: {part} does not fit: {exc}") from exc
    model.encoder_weights_sha256 = digest
    model.weights_changed()


def modules_state_dict(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """``name.key`` -> float32 CPU tensor for every entry of the modules' state dicts."""
    state = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            state[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
    return state


def decoder_state_dict(model: DeSAM) -> dict[str, torch.Tensor]:
    return modules_state_dict(model.decoder_modules())


def decoder_metadata(model: DeSAM, *, structure: str, training: dict[str, Any] | None,
                     format: str = DECODER_FORMAT) -> dict[str, Any]:
    return {
        "format": format,
        "format_version": DECODER_FORMAT_VERSION,
        "encoder": model.encoder_name,
        "encoder_weights_sha256": model.encoder_weights_sha256,
        "tap_indices": list(model.tap_indices),
        "tap_channels": list(model.image_encoder.tap_channels),
        "input": model.convention.to_json(),
        "structure": structure,
        "training": training or {},
    }


def _check_servable_layout(model: DeSAM, format: str) -> None:
    if format == DECODER_FORMAT and not model.pdmm.fuse_mask_embedding:
        raise ValueError("this model's PDMM has no mask-embedding fusion (the ablation): it cannot be written as a "
                         f"{DECODER_FORMAT!r} file; use format 'desam-decoder-no-fusion'")


def save_modules(model: DeSAM, path: str | os.PathLike, modules: Mapping[str, torch.nn.Module], *, format: str,
                 structure: str, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``modules`` (tensors named ``name.key``) with the decoder metadata of ``model``
    under ``format``, atomically; returns the metadata."""
    if not structure or not structure.strip():
        raise ValueError("a decoder file needs a structure name")
    meta = decoder_metadata(model, structure=structure.strip(), training=training, format=format)
    data = st_save(modules_state_dict(modules), metadata={"desam": json.dumps(meta, sort_keys=True)})
    atomic_write_bytes(Path(path), data)
    return meta


def save_decoder(
    model: DeSAM, path: str | os.PathLike, *, structure: str, training: dict[str, Any] | None = None,
    format: str = DECODER_FORMAT,
) -> dict[str, Any]:
    """Write PRIM + PDMM and their metadata atomically; returns the metadata. format: the
    service's ``desam-decoder`` unless the model is the no-fusion ablation."""
    _check_servable_layout(model, format)
    return save_modules(model, path, model.decoder_modules(), format=format, structure=structure, training=training)


def read_safetensors(path: str | os.PathLike, what: str, *, tensors: bool = True,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every file of ours is a safetensors container: its tensors (none when ``tensors`` is
    false: the header alone is parsed) and its header's ``__metadata__`` entries.
    ``CheckpointError`` names ``what`` for a missing file or an unreadable container."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        loaded = st_load(raw) if tensors else {}
        header = json.loads(raw[8: 8 + int.from_bytes(raw[:8], "little")])
        entries = header.get("__metadata__") or {}
        if not isinstance(entries, dict):
            raise ValueError("its __metadata__ is not a mapping")
    except (SafetensorError, ValueError, OverflowError, AttributeError) as exc:
        raise CheckpointError(f"{path}: not a readable {what} (truncated or corrupt): {exc}") from exc
    return loaded, entries


def read_metadata(path: str | os.PathLike, entries: Mapping[str, str], what: str, key: str = "desam",
                  ) -> dict[str, Any]:
    """The JSON object stored under ``key`` in a container's metadata entries."""
    try:
        meta = json.loads(entries[key])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable {what}: no metadata of ours under {key!r} (another kind of "
                              f"safetensors file?)") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a readable {what}: its {key!r} metadata is not a JSON object")
    return meta


def read_decoder(path: str | os.PathLike, *, format: str = DECODER_FORMAT,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a decoder file's container and metadata (not yet the model fit);
    its format must be ``format``."""
    path = Path(path)
    tensors, entries = read_safetensors(path, "DeSAM decoder file")
    meta = read_metadata(path, entries, "DeSAM decoder file")
    found = meta.get("format")
    if found != format:
        what = f" ({OTHER_FORMATS[found]})" if found in OTHER_FORMATS else ""
        raise CheckpointError(f"{path}: format {found!r}{what} is not {format!r}")
    if meta.get("format_version") != DECODER_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: decoder format version {meta.get('format_version')} is not supported "
            f"(this build reads version {DECODER_FORMAT_VERSION})"
        )
    return tensors, meta


def read_model_metadata(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(family, metadata) of a file the service serves (``SERVED_FORMATS``): the container
    and its metadata read, the format known, the structure named; the tensors' fit to a
    model is the family's loader's to check. A DeSAM decoder file is read whole
    (``read_decoder``); the others' own readers check their tensors when loaded."""
    path = Path(path)
    _, entries = read_safetensors(path, "model file", tensors=False)
    meta = read_metadata(path, entries, "model file")
    found = meta.get("format")
    if found not in SERVED_FORMATS:
        what = f" ({OTHER_FORMATS[found]})" if found in OTHER_FORMATS else ""
        raise CheckpointError(f"{path}: format {found!r}{what} is not one the service serves "
                              f"({', '.join(SERVED_FORMATS)})")
    if found == DECODER_FORMAT:
        meta = read_decoder(path)[1]
    return SERVED_FORMATS[found], meta


def load_modules(model: DeSAM, path: str | os.PathLike, modules: Mapping[str, torch.nn.Module], *,
                 format: str) -> dict[str, Any]:
    """Load ``modules`` from a file of ``format`` after checking that it was made for this
    encoder (name, tap layout and, when both are known, encoder weights hash); returns the
    file's metadata."""
    path = Path(path)
    tensors, meta = read_decoder(path, format=format)
    if meta.get("encoder") != model.encoder_name:
        raise CheckpointError(
            f"{path}: decoder was trained for encoder {meta.get('encoder')!r}, "
            f"the loaded encoder is {model.encoder_name!r}"
        )
    if list(meta.get("tap_indices", [])) != list(model.tap_indices):
        raise CheckpointError(f"{path}: decoder taps {meta.get('tap_indices')} != model taps {list(model.tap_indices)}")
    theirs, ours = meta.get("encoder_weights_sha256"), model.encoder_weights_sha256
    if theirs != ours:
        raise CheckpointError(
            f"{path}: decoder was trained on encoder weights {theirs or 'random (none)'}, "
            f"the loaded encoder weights are {ours or 'random (none)'}"
        )
    expected = set(modules_state_dict(modules))
    _check_keys(path, expected, set(tensors))
    for name, module in modules.items():
        prefix = name + "."
        sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: {name} does not fit: {exc}") from exc
    model.weights_changed()
    return meta


def load_decoder(model: DeSAM, path: str | os.PathLike, *, format: str = DECODER_FORMAT) -> dict[str, Any]:
    """Load PRIM + PDMM from a decoder file after checking that it was made for this
    encoder (name, tap layout and, when both are known, encoder weights hash). format: the
    service's ``desam-decoder``, or ``desam-decoder-no-fusion`` into the ablation model."""
    path = Path(path)
    if format == DECODER_FORMAT and not model.pdmm.fuse_mask_embedding:
        raise CheckpointError(f"{path}: this model's PDMM has no mask-embedding fusion (the ablation); it loads "
                              "'desam-decoder-no-fusion' files only")
    meta = load_modules(model, path, model.decoder_modules(), format=format)
    model.decoder_metadata = meta
    return meta
