"""A trained DB-SAM model in the form the engine serves.

``load_servable(base_model, path)``: from the service's base DeSAM (its frozen encoder
and prompt encoder are shared, not copied) and a DB-SAM model file
(``modeling.dbsam_file``, written by the ``dbsam`` training family and its ablations),
a ``DBSAM`` on the base's device in eval mode. ``SlicePredictor`` serves it unchanged
for box (and point) prompts: ``set_image`` runs DB-SAM's encoder, ``predict`` its own
SAM mask decoder. Its ``encoder_name`` (``<base>+dbsam``) and ``encoder_weights_sha256``
(over the base's checkpoint hash and the DB-SAM blocks) are its own, so a feature cache
keyed by them keeps its features apart from the base encoder's and from another DB-SAM
file's. DeSAM's automatic modes refuse it (no PRIM + PDMM): its prompt-free use is a
box from the caller (the whole slice, a neighbour's mask, a ROI).

Note for feature caches: its ``ImageFeatures`` have no taps (the embedding is all SAM's
mask decoder reads).
"""

from __future__ import annotations

import os

from ..modeling.dbsam_file import load_dbsam_model, model_options, read_dbsam_model
from ..modeling.dbsam_model import DBSAM, build_dbsam_model
from ..modeling.desam import DeSAM

__all__ = ["load_servable"]


def load_servable(base_model: DeSAM, path: str | os.PathLike) -> DBSAM:
    """The DB-SAM model of the file at ``path`` beside ``base_model`` (not changed); a file
    that does not fit (another format, base encoder or weights, ...) raises
    ``CheckpointError`` with the reason."""
    _, meta = read_dbsam_model(path)
    model = build_dbsam_model(base_model, checkpoint_stages=False, **model_options(meta))
    load_dbsam_model(model, path)
    return model.eval()
