"""``FastPath``: the decoders' inference fast path, chosen explicitly by the caller.

``segment_anything``'s modules (and PRIM's / PDMM's ``forward``) stay the reference and
the training path: a caller that passes no ``FastPath`` runs them as written, with or
without autograd. Inference code (``SlicePredictor``, the service) passes one; its fields
switch the parts of the fast path, each tested equal to the modules within float
rounding and kept because it pays (docs/benchmarks/click_fast_path.md has the
side-by-side table and the command that measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FastPath"]


@dataclass(frozen=True)
class FastPath:
    """Parts of the inference fast path (all on by default).

    reassociate: the two-way transformer's attentions reassociated for few prompt tokens
      (``decoder_fast``); off: the modules' own forwards (the other decoder parts need it).
    slice_cache: the first block's image side computed once per slice and reused by every
      prompt on it (``SliceDecoderState``).
    matrix_upscaling: SAM's upscaling as channels-last matrix products
      (``decoder_upscale``); off: its modules.
    factored_mask_input: a refinement's mask input kept as a rank-16 term, so that the
      slice's cached first block serves it too (needs ``slice_cache``).
    """

    reassociate: bool = True
    slice_cache: bool = True
    matrix_upscaling: bool = True
    factored_mask_input: bool = True

    def __post_init__(self) -> None:
        if not self.reassociate and (self.slice_cache or self.matrix_upscaling):
            raise ValueError("slice_cache and matrix_upscaling need reassociate=True")
        if not self.slice_cache and self.factored_mask_input:
            raise ValueError("factored_mask_input needs slice_cache=True")

    @classmethod
    def without(cls, *parts: str) -> FastPath:
        """All parts but ``parts`` (and those that need them)."""
        needs = {"reassociate": ("slice_cache", "matrix_upscaling", "factored_mask_input"),
                 "slice_cache": ("factored_mask_input",)}
        off = set(parts)
        unknown = off - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fast-path part(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        for part in parts:
            off.update(needs.get(part, ()))
        return cls(**{name: name not in off for name in cls.__dataclass_fields__})
