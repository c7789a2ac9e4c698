"""Process-level runtime settings: glibc malloc tuning, device and precision choice.

On CPU, PyTorch's large short-lived activations make glibc's default malloc return memory
to the OS and fault it back in on every forward pass; keeping freed memory in the heap
(no mmap for large blocks, no trimming) avoids millions of page faults per encoder pass.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

# glibc <malloc.h> parameter numbers.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1

# The same settings for a launcher that prefers environment variables (glibc tunables
# read at process start, before Python runs).
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(INT_MAX)}

_malloc_state: dict[str, bool] = {}


def configure_malloc(enable: bool = True) -> bool:
    """Apply the malloc settings to this process (once). Returns True when applied.

    Disabled by ``DESAM_MALLOPT=0``. A no-op (False) where glibc is not the allocator.
    """
    if not enable or os.environ.get("DESAM_MALLOPT", "1") == "0":
        return False
    if "applied" in _malloc_state:
        return _malloc_state["applied"]
    applied = False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, INT_MAX))
    except (OSError, AttributeError):
        applied = False
    _malloc_state["applied"] = applied
    log.info("glibc mallopt tuning %s", "applied" if applied else "not available")
    return applied


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bfloat16 arithmetic (AVX512-BF16 or AMX-BF16).

    Without it PyTorch emulates bf16 and autocast is much slower than fp32 (measured on
    this project's AVX2 build machines: a 1024^2 bf16 matmul ~160x slower than fp32).
    ``DESAM_CPU_BF16=1`` or ``0`` overrides the detection.
    """
    override = os.environ.get("DESAM_CPU_BF16")
    if override in ("0", "1"):
        return override == "1"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto' / None -> CUDA when available, else CPU; other names pass through."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but torch.cuda.is_available() is False")
    return device


@dataclass(frozen=True)
class Precision:
    """Autocast choice for the encoder on one device; ``dtype`` None means fp32."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return "fp32" if self.dtype is None else str(self.dtype).replace("torch.", "")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(device: torch.device, mode: str = "auto") -> Precision:
    """mode 'auto': bf16 on CUDA with bf16 support (fp16 on older GPUs), bf16 on CPUs with
    native bf16, else fp32. 'fp32', 'bf16' and 'fp16' force a choice."""
    mode = mode.lower()
    if mode == "fp32":
        return Precision(device.type, None)
    if mode in ("bf16", "fp16"):
        return Precision(device.type, torch.bfloat16 if mode == "bf16" else torch.float16)
    if mode != "auto":
        raise ValueError(f"unknown precision {mode!r}: use auto, fp32, bf16 or fp16")
    if device.type == "cuda":
        return Precision("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if device.type == "cpu" and cpu_has_native_bf16():
        return Precision("cpu", torch.bfloat16)
    return Precision(device.type, None)
