"""Fine-tuning decoders on cached encoder features.

The machinery is independent of one model's decoder: ``cases`` and ``split`` make the
data, ``variants`` the image-changing augmentations (encoded as volumes of their own),
``samples`` the slices a run uses, ``features`` their cached encoder features,
``family`` the interface a model family plugs in (``desam_family`` is DeSAM's), and
``trainer`` the loop (single process or torchrun/DDP), with ``train_state`` for resume,
``curve`` for the training-curve PNG and ``evaluate`` for whole-volume evaluation.
"""
