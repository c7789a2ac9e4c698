"""Runtime settings: malloc tuning, precision choice, device resolution, `info`."""

from __future__ import annotations

import json

import pytest
import torch

from desam_server.cli import main
from desam_server.engine import runtime


def test_malloc_tuning_applies_on_glibc_and_can_be_disabled(monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_state", {})
    monkeypatch.setenv("DESAM_MALLOPT", "0")
    assert runtime.configure_malloc() is False
    monkeypatch.setenv("DESAM_MALLOPT", "1")
    import platform

    expected = platform.libc_ver()[0] == "glibc"
    assert runtime.configure_malloc() is expected
    assert runtime.MALLOC_ENV == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def test_precision_follows_native_bf16_support(monkeypatch):
    cpu = torch.device("cpu")
    runtime.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("DESAM_CPU_BF16", "0")
    assert runtime.choose_precision(cpu).dtype is None
    runtime.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("DESAM_CPU_BF16", "1")
    assert runtime.choose_precision(cpu).dtype is torch.bfloat16
    runtime.cpu_has_native_bf16.cache_clear()
    monkeypatch.delenv("DESAM_CPU_BF16")
    flags = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert runtime.cpu_has_native_bf16() is native
    assert runtime.choose_precision(cpu, "fp32").name == "fp32"
    assert runtime.choose_precision(cpu, "bf16").name == "bfloat16"
    with pytest.raises(ValueError, match="unknown precision"):
        runtime.choose_precision(cpu, "int8")
    runtime.cpu_has_native_bf16.cache_clear()


def test_device_resolution():
    assert runtime.resolve_device("cpu").type == "cpu"
    assert runtime.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA was requested"):
            runtime.resolve_device("cuda")


def test_info_reports_device_precision_and_weights(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"] == "cpu" and info["default_weights"] == "mobile_sam"
    assert info["embedded_default"].startswith("MobileSAM")
    assert set(info["weights"]) >= {"mobile_sam", "lite_medsam", "sam_vit_h"}
    assert info["encoder_precision"] in ("fp32", "bfloat16")
