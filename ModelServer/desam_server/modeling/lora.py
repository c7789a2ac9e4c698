"""LoRA on the attention projections of SAM's image encoders (SAM-Mix: rank 8), merging
for serving, and files holding only the adapters.

Targets: every attention module's ``qkv`` projection (and, with ``include_proj``, its
output projection ``proj``):
  SAM ViT (``ImageEncoderViT`` and our ``TappedImageEncoderViT``): ``blocks.<i>.attn.qkv``
    in every block;
  TinyViT (MobileSAM / LiteMedSAM): ``layers.<s>.blocks.<j>.attn.qkv`` in the attention
    stages 1-3 (stage 0 is convolutional and has none).
The adapted encoder is an encoder the caller owns: ``add_lora`` replaces those children
in it (or in a copy), nothing is patched in ``segment_anything``'s classes or modules
outside that encoder, and no hook is installed.

Trainable parameters, rank r, ``qkv`` only: r * (C + 3C) = 4 r C per block of width C;
with ``proj`` also, 2 r C more. r = 8: vit_b 294,912; vit_l 786,432; vit_h 1,310,720;
mobile_sam 59,392 (see ``Testing/ModelServer/test_sammix_model.py``).
"""

from __future__ import annotations

import copy as copy_module
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from segment_anything.modeling.image_encoder import Attention as SamAttention
from torch import nn

from ..atomic import atomic_write_bytes
from .checkpoint import CheckpointError, read_metadata, read_safetensors
from .lora_linear import LoRALinear
from .tiny_vit_blocks import WindowAttention

LORA_FORMAT = "sam-lora"
LORA_FORMAT_VERSION = 1
#: The attention modules whose projections are adapted.
ATTENTION_TYPES = (SamAttention, WindowAttention)


def lora_target_names(encoder: nn.Module, *, include_proj: bool = False) -> list[str]:
    """Qualified names of the projections ``add_lora`` adapts, in module order
    (``blocks.0.attn.qkv``, ...). Raises when the encoder has no attention module."""
    children = ("qkv", "proj") if include_proj else ("qkv",)
    names = [f"{name}.{child}" for name, module in encoder.named_modules()
             if isinstance(module, ATTENTION_TYPES) for child in children]
    if not names:
        raise ValueError(f"{type(encoder).__name__} has no SAM ViT or TinyViT attention module to adapt")
    return names


def _replace(encoder: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = encoder.get_submodule(parent_name) if parent_name else encoder
    setattr(parent, child, new)


def add_lora(encoder: nn.Module, *, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
             include_proj: bool = False, copy: bool = True) -> nn.Module:
    """The encoder with a ``LoRALinear`` around each target projection (see the module
    docstring), every other parameter frozen: only the adapters' A and B train.

    copy: True (default) adapts a deep copy and leaves ``encoder`` untouched; False
      replaces the projections in ``encoder`` itself (the caller's own object; saves the
      copy's memory for the large encoders) and returns it.
    rank, alpha, dropout: see ``LoRALinear`` (alpha None: alpha = rank).
    A fresh adapter's B is zero, so the adapted encoder computes exactly what the
    encoder did.
    """
    already = list(lora_modules(encoder))
    if already:
        raise ValueError(f"the encoder already carries {len(already)} LoRA adapters ({already[0]}, ...); "
                         "merge them or start from the plain encoder")
    names = lora_target_names(encoder, include_proj=include_proj)
    target = copy_module.deepcopy(encoder) if copy else encoder
    target.requires_grad_(False)
    for name in names:
        base = target.get_submodule(name)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not an nn.Linear")
        _replace(target, name, LoRALinear(base, rank=rank, alpha=alpha, dropout=dropout))
    return target


def lora_modules(encoder: nn.Module) -> dict[str, LoRALinear]:
    """Qualified name -> adapter, for every ``LoRALinear`` in the encoder."""
    return {name: module for name, module in encoder.named_modules() if isinstance(module, LoRALinear)}


def lora_parameters(encoder: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B weights: what an optimizer of a LoRA-adapted encoder gets."""
    return [p for module in lora_modules(encoder).values()
            for p in (module.lora_a.weight, module.lora_b.weight)]


def lora_state_dict(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """``<target>.lora_a.weight`` / ``<target>.lora_b.weight`` -> tensor (detached
    views: the encoder's own storage), the adapters only."""
    state = {}
    for name, module in lora_modules(encoder).items():
        state[f"{name}.lora_a.weight"] = module.lora_a.weight.detach()
        state[f"{name}.lora_b.weight"] = module.lora_b.weight.detach()
    return state


def merge_lora(encoder: nn.Module, *, copy: bool = True) -> nn.Module:
    """The encoder with every ``LoRALinear`` replaced by its ``merged()`` ``nn.Linear``
    (W + (alpha / rank) B A): no adapter left, the original state-dict layout (SAM's own
    key names), and the cost of the base encoder. Equal to the adapted encoder in eval mode
    up to float rounding. copy: as in ``add_lora``. Raises when there is nothing to merge.
    """
    modules = lora_modules(encoder)
    if not modules:
        raise ValueError("the encoder carries no LoRA adapter to merge")
    target = copy_module.deepcopy(encoder) if copy else encoder
    for name, module in lora_modules(target).items():
        _replace(target, name, module.merged())
    return target


def _adapter_layout(encoder: nn.Module) -> tuple[int, float, list[str]]:
    modules = lora_modules(encoder)
    if not modules:
        raise ValueError("the encoder carries no LoRA adapter")
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"the adapters differ in rank {sorted(ranks)} or alpha {sorted(alphas)}")
    return ranks.pop(), alphas.pop(), list(modules)


def save_lora(encoder: nn.Module, path: str | os.PathLike, *, encoder_name: str,
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write only the adapters' weights (float32, safetensors) atomically, with JSON
    metadata under the header key ``desam``: format ``sam-lora``, its version, rank,
    alpha, targets, ``encoder_name`` and the caller's ``metadata``. Returns the metadata."""
    rank, alpha, targets = _adapter_layout(encoder)
    meta = {"format": LORA_FORMAT, "format_version": LORA_FORMAT_VERSION, "encoder": encoder_name,
            "rank": rank, "alpha": alpha, "targets": targets, "extra": metadata or {}}
    tensors = {k: v.to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(encoder).items()}
    atomic_write_bytes(Path(path), st_save(tensors, metadata={"desam": json.dumps(meta, sort_keys=True)}))
    return meta


def read_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata of a ``sam-lora`` file, its container and format checked."""
    path = Path(path)
    tensors, entries = read_safetensors(path, "LoRA file")
    meta = read_metadata(path, entries, "LoRA file")
    if meta.get("format") != LORA_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {LORA_FORMAT!r}")
    if meta.get("format_version") != LORA_FORMAT_VERSION:
        raise CheckpointError(f"{path}: LoRA format version {meta.get('format_version')} is not supported "
                              f"(this build reads version {LORA_FORMAT_VERSION})")
    return tensors, meta


def load_lora(encoder: nn.Module, path: str | os.PathLike, *, encoder_name: str) -> dict[str, Any]:
    """Load a ``save_lora`` file into an encoder adapted by ``add_lora`` with the same
    targets, rank and alpha, strictly: the encoder name, rank, alpha, the set of keys and
    every shape must match, or ``CheckpointError`` says what differs and nothing is
    loaded. Returns the file's metadata."""
    path = Path(path)
    tensors, meta = read_lora(path)
    if meta.get("encoder") != encoder_name:
        raise CheckpointError(f"{path}: adapters were made for encoder {meta.get('encoder')!r}, not {encoder_name!r}")
    rank, alpha, _ = _adapter_layout(encoder)
    if meta.get("rank") != rank or meta.get("alpha") != alpha:
        raise CheckpointError(f"{path}: adapters of rank {meta.get('rank')}, alpha {meta.get('alpha')}; "
                              f"the encoder's are rank {rank}, alpha {alpha:g}")
    ours = lora_state_dict(encoder)
    missing, unexpected = sorted(set(ours) - set(tensors)), sorted(set(tensors) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{path}: does not match the encoder's adapters: {len(missing)} missing keys "
                              f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}")
    wrong = [k for k, v in ours.items() if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, "
                              f"the encoder's is {tuple(ours[wrong[0]].shape)}")
    with torch.no_grad():
        for key, value in ours.items():
            value.copy_(tensors[key])
    return meta
