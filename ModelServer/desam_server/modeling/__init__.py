"""DeSAM model code: encoder taps, PRIM, PDMM, the assembly, builders and checkpoints."""

from ..hashing import sha256_file
from .build import ENCODERS, EncoderSpec, build_decoders, build_desam, count_parameters, get_spec
from .checkpoint import CheckpointError, load_decoder, load_sam_checkpoint, save_decoder
from .decoder_state import SliceDecoderState
from .desam import DeSAM, ImageFeatures, InputConvention
from .fast_path import FastPath
from .pdmm import PDMM
from .prim import PRIM

__all__ = [
    "ENCODERS", "EncoderSpec", "build_decoders", "build_desam", "count_parameters", "get_spec",
    "CheckpointError", "load_decoder", "load_sam_checkpoint", "save_decoder", "sha256_file",
    "DeSAM", "FastPath", "ImageFeatures", "InputConvention", "PDMM", "PRIM", "SliceDecoderState",
]
