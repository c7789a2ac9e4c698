"""SAM-Mix's trained file: one safetensors file holding what training changed (the slice
classifier with its batch-norm statistics, the encoder's LoRA adapters, SAM's mask
decoder) and, under the header key ``desam``, JSON metadata:

- ``format`` ``sam-mix``, ``format_version`` 1;
- ``encoder``, ``encoder_weights_sha256`` and ``input`` (convention): the base encoder
  the adapters were trained on (a file is loaded onto that encoder only);
- ``structure``;
- ``classifier`` (depth, in_chans, output_stride) and ``lora`` (rank, alpha, targets):
  the layout ``build_sammix`` rebuilds;
- ``lora_sha256``: sha256 over the adapters' tensors (names and float32 bytes, sorted),
  checked on load; with the base weights' hash it names the adapted encoder's features
  (``sammix_serving.adapted_encoder_sha256``);
- ``inference``: threshold, omega, largest_only (the options ``predict_slice`` uses);
- ``training``: the training record.

Tensors: ``classifier.<key>`` (its state dict, buffers included), ``lora.<target>.lora_a
.weight`` / ``lora.<target>.lora_b.weight``, ``mask_decoder.<key>``; float32 (the batch
norm's integer step counters as they are). Written atomically; read strictly: another
format (a DeSAM decoder, a plain LoRA file), another version, another encoder, a missing
or unexpected tensor, a wrong shape or adapters whose hash does not match are refused
with ``CheckpointError`` and nothing is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ..atomic import atomic_write_bytes
from ..modeling.checkpoint import CheckpointError, read_metadata, read_safetensors
from ..modeling.lora import lora_modules
from .sammix import SamMix, build_sammix

__all__ = ["SAMMIX_FORMAT", "SAMMIX_FORMAT_VERSION", "save_sammix", "read_sammix", "load_sammix_into",
           "build_from_file", "sammix_tensors", "lora_sha256"]

SAMMIX_FORMAT = "sam-mix"
SAMMIX_FORMAT_VERSION = 1
INFERENCE_KEYS = ("threshold", "omega", "largest_only")


def sammix_tensors(sammix: SamMix) -> dict[str, torch.Tensor]:
    """The trained parts as the file holds them (CPU, float32; integer buffers kept)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu")
        out[name] = (value.float() if value.is_floating_point() else value).contiguous()

    for key, value in sammix.classifier.state_dict().items():
        put(f"classifier.{key}", value)
    for target, module in lora_modules(sammix.image_encoder).items():
        put(f"lora.{target}.lora_a.weight", module.lora_a.weight)
        put(f"lora.{target}.lora_b.weight", module.lora_b.weight)
    for key, value in sammix.mask_decoder.state_dict().items():
        put(f"mask_decoder.{key}", value)
    return out


def lora_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the ``lora.*`` tensors: each name, shape and float32 bytes, sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith("lora.")):
        value = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(value.shape)}\n".encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def _layout(sammix: SamMix) -> tuple[dict[str, Any], dict[str, Any]]:
    modules = lora_modules(sammix.image_encoder)
    if not modules:
        raise ValueError("a SAM-Mix file holds LoRA adapters: this SamMix's encoder carries none (merged?)")
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"the adapters differ in rank {sorted(ranks)} or alpha {sorted(alphas)}")
    c = sammix.classifier
    classifier = {"depth": c.depth, "in_chans": c.in_chans, "output_stride": c.output_stride}
    lora = {"rank": ranks.pop(), "alpha": alphas.pop(), "targets": list(modules)}
    return classifier, lora


def save_sammix(sammix: SamMix, path: str | os.PathLike, *, structure: str, inference: dict[str, Any],
                training: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the trained parts and the metadata (module docstring) atomically; returns the
    metadata. ``inference``: threshold, omega, largest_only."""
    if not structure or not structure.strip():
        raise ValueError("a SAM-Mix file needs a structure name")
    if set(inference) != set(INFERENCE_KEYS):
        raise ValueError(f"inference options must be exactly {', '.join(INFERENCE_KEYS)}")
    classifier, lora = _layout(sammix)
    tensors = sammix_tensors(sammix)
    meta = {"format": SAMMIX_FORMAT, "format_version": SAMMIX_FORMAT_VERSION, "encoder": sammix.encoder_name,
            "encoder_weights_sha256": sammix.encoder_weights_sha256, "input": sammix.convention.to_json(),
            "structure": structure.strip(), "classifier": classifier, "lora": lora,
            "lora_sha256": lora_sha256(tensors), "inference": dict(inference), "training": training or {}}
    atomic_write_bytes(Path(path), st_save(tensors, metadata={"desam": json.dumps(meta, sort_keys=True)}))
    return meta


def read_sammix(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a SAM-Mix file, its container, format, version and
    adapter hash checked (not yet its fit to a model)."""
    path = Path(path)
    tensors, entries = read_safetensors(path, "SAM-Mix file")
    meta = read_metadata(path, entries, "SAM-Mix file")
    if meta.get("format") != SAMMIX_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {SAMMIX_FORMAT!r} (a SAM-Mix model "
                              "file)")
    if meta.get("format_version") != SAMMIX_FORMAT_VERSION:
        raise CheckpointError(f"{path}: SAM-Mix format version {meta.get('format_version')} is not supported "
                              f"(this build reads version {SAMMIX_FORMAT_VERSION})")
    for key in ("classifier", "lora", "inference", "lora_sha256", "structure"):
        if key not in meta:
            raise CheckpointError(f"{path}: SAM-Mix metadata lacks {key!r}")
    if lora_sha256(tensors) != meta["lora_sha256"]:
        raise CheckpointError(f"{path}: the adapters' hash does not match the metadata (a modified file)")
    return tensors, meta


def _check_base(path: Path, meta: dict[str, Any], encoder_name: str, encoder_sha: str | None, convention) -> None:
    if meta.get("encoder") != encoder_name:
        raise CheckpointError(f"{path}: SAM-Mix model trained on encoder {meta.get('encoder')!r}, the loaded "
                              f"encoder is {encoder_name!r}")
    if meta.get("encoder_weights_sha256") != encoder_sha:
        raise CheckpointError(f"{path}: SAM-Mix model trained on encoder weights "
                              f"{meta.get('encoder_weights_sha256') or 'random (none)'}, the loaded encoder "
                              f"weights are {encoder_sha or 'random (none)'}")
    if meta.get("input") != convention.to_json():
        raise CheckpointError(f"{path}: the file's input convention {meta.get('input')} is not the encoder's")


def load_sammix_into(sammix: SamMix, path: str | os.PathLike) -> dict[str, Any]:
    """Load a SAM-Mix file into a SamMix of the same layout (``build_sammix`` with the
    file's classifier depth and LoRA rank, alpha and targets) built on the same base
    encoder; strict (module docstring). Returns the metadata."""
    path = Path(path)
    tensors, meta = read_sammix(path)
    _check_base(path, meta, sammix.encoder_name, sammix.encoder_weights_sha256, sammix.convention)
    classifier, lora = _layout(sammix)
    if meta["classifier"] != classifier:
        raise CheckpointError(f"{path}: classifier {meta['classifier']} does not match the model's {classifier}")
    if meta["lora"] != lora:
        raise CheckpointError(f"{path}: adapters (rank {meta['lora'].get('rank')}, alpha "
                              f"{meta['lora'].get('alpha')}, {len(meta['lora'].get('targets', []))} targets) do not "
                              f"match the model's (rank {lora['rank']}, alpha {lora['alpha']}, "
                              f"{len(lora['targets'])} targets)")
    ours = sammix_tensors(sammix)
    missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the model: {len(missing)} missing tensors {missing[:4]}, "
                              f"{len(unexpected)} unexpected {unexpected[:4]}")
    wrong = [k for k, v in ours.items() if tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model's is "
                              f"{tuple(ours[wrong[0]].shape)}")
    device = sammix.device

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}

    sammix.classifier.load_state_dict(part("classifier."), strict=True)
    sammix.mask_decoder.load_state_dict(part("mask_decoder."), strict=True)
    with torch.no_grad():
        for target, module in lora_modules(sammix.image_encoder).items():
            module.lora_a.weight.copy_(tensors[f"lora.{target}.lora_a.weight"])
            module.lora_b.weight.copy_(tensors[f"lora.{target}.lora_b.weight"])
    return meta


def build_from_file(base_model, path: str | os.PathLike) -> tuple[SamMix, dict[str, Any]]:
    """A SamMix (LoRA unmerged, eval mode) on ``base_model``'s device, built with the
    file's layout from ``base_model`` (a DeSAM: its encoder, prompt encoder and mask
    decoder are copied, never changed) and loaded from the file; and the metadata."""
    path = Path(path)
    _, meta = read_sammix(path)
    _check_base(path, meta, base_model.encoder_name, base_model.encoder_weights_sha256, base_model.convention)
    classifier, lora = meta["classifier"], meta["lora"]
    if classifier.get("in_chans") != 1:
        raise CheckpointError(f"{path}: classifier with {classifier.get('in_chans')} input channels is not supported")
    targets = list(lora.get("targets", []))
    sammix = build_sammix(base_model, classifier_depth=classifier.get("depth"),
                          classifier_output_stride=classifier.get("output_stride"), rank=lora.get("rank"),
                          lora_alpha=lora.get("alpha"), include_proj=any(t.endswith(".proj") for t in targets))
    load_sammix_into(sammix, path)
    return sammix.requires_grad_(False).eval(), meta
