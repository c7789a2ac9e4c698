"""Precision ``auto``, the default of ``SlicePredictor``, the service and the CLI: bf16
exactly where the machine runs it natively (CUDA with bf16, CPUs reporting avx512_bf16 or
amx_bf16), fp32 on other CPUs, fp16 on GPUs without bf16. Runs everywhere: the detection
is replaced by a stand-in where a branch needs other hardware than this machine's.

The accuracy of the bf16 encoder itself is checked in ``test_real_weights``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from desam_server.engine import SlicePredictor, runtime
from desam_server.engine.runtime import Precision, choose_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_cpu_is_bf16_exactly_with_native_bf16(monkeypatch, tiny_model, native):
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    expected = Precision("cpu", torch.bfloat16 if native else None)
    assert choose_precision(CPU, "auto") == expected
    assert choose_precision(CPU, "AUTO") == expected
    assert SlicePredictor(tiny_model).precision == expected  # the predictor's default is auto
    assert expected.name == ("bfloat16" if native else "fp32")
    # Forced modes ignore the detection.
    assert choose_precision(CPU, "fp32") == Precision("cpu", None)
    assert choose_precision(CPU, "bf16") == Precision("cpu", torch.bfloat16)


def test_auto_is_the_service_default():
    from desam_server.api import ServiceSettings  # here: the other tests need no web stack

    assert ServiceSettings.load(environ={}).precision == "auto"


def test_auto_on_this_cpu_follows_its_flags():
    """No stand-in: what ``auto`` picks on this machine's CPU, against /proc/cpuinfo (or
    the ``DESAM_CPU_BF16`` override, when set)."""
    override = os.environ.get("DESAM_CPU_BF16")
    if override in ("0", "1"):
        native = override == "1"
    else:
        cpuinfo = Path("/proc/cpuinfo")
        if not cpuinfo.is_file():
            pytest.skip("no /proc/cpuinfo on this system: the detection answers False there")
        flags = set()
        for line in cpuinfo.read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
        native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert (choose_precision(CPU, "auto").dtype is torch.bfloat16) is native


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_auto_on_this_gpu_is_bf16_where_it_has_bf16():
    cuda = torch.device("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert choose_precision(cuda, "auto") == Precision("cuda", expected)
