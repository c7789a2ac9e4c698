"""Named state of the decoders' inference fast path (``decoder_fast``, ``decoder_upscale``).

Two kinds, each with one owner:

* per model, derived from weights only: ``ModelConstants`` (the dense positional encoding,
  each two-way transformer's ``TransformerConstants``, the SAM decoder's
  ``UpscaleProjection``). A ``DeSAM`` owns one and replaces it, under a new *generation*
  number, whenever its weights change (``DeSAM.weights_changed``: checkpoint loading,
  ``to()``, an optimizer step in training code); the parts are built lazily by the first
  inference call that needs them.
* per slice: ``SliceDecoderState``, owned by the slice's ``ImageFeatures``: work every
  prompt on that slice shares (the first block's image side, PDMM's image part). It
  records the generation it was computed with; a model of another generation clears it
  before use (``bind``), so a swapped decoder or changed weights never read stale slice
  work.

Generations come from one process-wide counter, so no two models (or two weight versions
of one model) ever share a number.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from torch import Tensor

__all__ = [
    "AttentionPositional", "TransformerConstants", "UpscaleProjection", "FirstBlock",
    "TransformerSliceCache", "SliceDecoderState", "ModelConstants", "next_generation",
]

_generations = itertools.count(1)


def next_generation() -> int:
    """A weights generation number never handed out before in this process."""
    return next(_generations)


@dataclass(frozen=True)
class AttentionPositional:
    """The positional halves of one attention block's image-side projections (P: the dense
    positional encoding, L x C).

    keys: L x D, ``Wk P + bk`` of the block's token-to-image attention; keys_by_head: the
    same as H x d x L; queries: L x D, ``Wq P + bq`` of its image-to-token attention (None
    for the transformer's final attention, which has none)."""

    keys: Tensor
    keys_by_head: Tensor
    queries: Tensor | None


@dataclass(frozen=True)
class TransformerConstants:
    """Per two-way transformer: the positional parts of each block and of the final
    token-to-image attention."""

    blocks: tuple[AttentionPositional, ...]
    final: AttentionPositional


@dataclass(frozen=True)
class UpscaleProjection:
    """SAM's two upscaling layers (2 x 2 stride-2 transposed convolutions) as matrices:
    ``first`` C x 4C' and ``first_bias``, ``second`` C' x 4C'' and ``second_bias``."""

    first: Tensor
    first_bias: Tensor
    second: Tensor
    second_bias: Tensor


@dataclass(frozen=True)
class FirstBlock:
    """One slice's first-block image side, shared by every prompt on the slice.

    tokens: L x C, the bare image tokens (contiguous); keys: H x d x L and values:
    H x L x d of the block's token-to-image attention, per head, positional part and
    biases included; queries: L x D of its image-to-token attention, likewise."""

    tokens: Tensor
    keys: Tensor
    values: Tensor
    queries: Tensor


@dataclass
class TransformerSliceCache:
    """A slice's shared work for one two-way transformer: its ``FirstBlock``."""

    first_block: FirstBlock | None = None


@dataclass
class SliceDecoderState:
    """Per-slice decoder work (see the module docstring). ``generation``: that of the model
    whose results are held (None: empty)."""

    generation: int | None = None
    sam: TransformerSliceCache = field(default_factory=TransformerSliceCache)
    prim: TransformerSliceCache = field(default_factory=TransformerSliceCache)
    pdmm_skips: list[Tensor] | None = None

    def bind(self, generation: int) -> SliceDecoderState:
        """This state for a model of ``generation``: cleared first when it holds another
        generation's work."""
        if self.generation != generation:
            self.sam = TransformerSliceCache()
            self.prim = TransformerSliceCache()
            self.pdmm_skips = None
            self.generation = generation
        return self


@dataclass
class ModelConstants:
    """Per-model values derived from the weights of one generation (see the module
    docstring); each part is filled by the first call that needs it."""

    generation: int = field(default_factory=next_generation)
    dense_pe: Tensor | None = None
    sam: TransformerConstants | None = None
    sam_upscale: UpscaleProjection | None = None
    prim: TransformerConstants | None = None

