"""T1 MR brain samples for the "brain" decoder: the MNI152 template (training), synthetic
heads built around it (training: skull and scalp the template lacks), and the Colin27
head (cross-domain check). Every sample is a ``BrainSample``: a ``Volume`` and a brain
mask on its grid. See docs/DATA_SAMPLES.md."""

from . import colin27, common, mni152
from .colin27 import fetch_colin27
from .common import BrainSample
from .mni152 import fetch_mni152
from .synthetic_head import synthetic_head, synthetic_heads, tissue_probability

__all__ = ["colin27", "common", "mni152", "BrainSample", "fetch_mni152", "fetch_colin27", "synthetic_head",
           "synthetic_heads", "tissue_probability"]
