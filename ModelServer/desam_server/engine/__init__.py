"""Inference engine: preprocessing, runtime settings and the slice predictor."""

from .predictor import AutoResult, SlicePredictor, UntrainedDecoderError
from .preprocess import PREPROCESSING_VERSION, IntensityWindow, apply_window, prepare_input, to_rgb
from .runtime import choose_precision, configure_malloc, cpu_has_native_bf16, resolve_device

__all__ = [
    "AutoResult", "SlicePredictor", "UntrainedDecoderError", "PREPROCESSING_VERSION",
    "IntensityWindow", "apply_window", "prepare_input", "to_rgb", "choose_precision",
    "configure_malloc", "cpu_has_native_bf16", "resolve_device",
]
