"""DeSAM model code: encoder taps, PRIM, PDMM, the assembly, builders and checkpoints."""

from .build import ENCODERS, EncoderSpec, build_decoders, build_desam, count_parameters, get_spec
from ..hashing import sha256_file
from .checkpoint import CheckpointError, load_decoder, load_sam_checkpoint, save_decoder
from .desam import DeSAM, ImageFeatures, InputConvention
from .pdmm import PDMM
from .prim import PRIM

__all__ = [
    "ENCODERS", "EncoderSpec", "build_decoders", "build_desam", "count_parameters", "get_spec",
    "CheckpointError", "load_decoder", "load_sam_checkpoint", "save_decoder", "sha256_file",
    "DeSAM", "ImageFeatures", "InputConvention", "PDMM", "PRIM",
]
