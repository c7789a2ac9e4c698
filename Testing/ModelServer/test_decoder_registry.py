"""The decoder registry on disk: versions, activation, rollback, deletion, records; and
that writers killed at any moment, or writing at the same time, never leave a corrupt or
half-registered version."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from desam_server.decoder_registry import (
    DecoderRegistry,
    RegistryConflict,
    UnknownVersion,
    default_registry_dir,
)
from desam_server.modeling.checkpoint import CheckpointError, read_decoder

from service_helpers import decoder_files

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32   # the signature is all the registry checks


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    tmp = tmp_path_factory.mktemp("decoders")
    return decoder_files(tmp, "organ", 2, training={"note": "test"})


@pytest.fixture()
def curve(tmp_path) -> Path:
    path = tmp_path / "curve.png"
    path.write_bytes(PNG)
    return path


def test_register_lists_records_and_activates(tmp_path, files, curve):
    registry = DecoderRegistry(tmp_path / "registry")
    assert registry.structures() == [] and not (tmp_path / "registry").exists()  # opening creates nothing
    first = registry.register(files[0], curve_png=curve)
    assert (first.structure, first.version, first.curve, first.encoder) == ("organ", "v1", True, "tiny")
    assert first.sha256 == hashlib.sha256(files[0].read_bytes()).hexdigest()
    second = registry.register(files[1], activate=False)
    assert second.version == "v2" and not second.curve
    assert registry.structures() == ["organ"]
    assert [v.version for v in registry.versions("organ")] == ["v1", "v2"]
    assert registry.active("organ").version == "v1"
    record = registry.record("organ", "v2")
    assert record["structure"] == "organ" and record["training"] == {"epochs": 2, "note": "test"}
    assert record == read_decoder(files[1])[1]
    assert registry.curve_path("organ", "v1").read_bytes() == PNG and registry.curve_path("organ", "v2") is None
    assert registry.path("organ", "v2").read_bytes() == files[1].read_bytes()
    (info, path), = registry.active_paths().values()
    assert info.version == "v1" and path == registry.path("organ", "v1")
    third = registry.register(files[1])           # activate=True by default
    assert registry.state("organ").active == third.version == "v3"
    assert registry.state("organ").history == ("v1",)
    # A second registry object on the same root (another process) sees the same.
    assert DecoderRegistry(tmp_path / "registry").state("organ") == registry.state("organ")


def test_activate_and_rollback_form_an_undo_stack(tmp_path, files):
    registry = DecoderRegistry(tmp_path)
    for path in (files[0], files[1], files[0]):
        registry.register(path)                     # v1, v2, v3 activated in turn
    assert registry.state("organ").history == ("v1", "v2")
    assert registry.activate("organ", "v3").history == ("v1", "v2")  # already active: nothing changes
    state = registry.activate("organ", "v1")
    assert (state.active, state.history) == ("v1", ("v1", "v2", "v3"))
    assert registry.rollback("organ").active == "v3"
    assert registry.rollback("organ").active == "v2"
    state = registry.rollback("organ")
    assert (state.active, state.history) == ("v1", ())
    with pytest.raises(RegistryConflict, match="no earlier active version"):
        registry.rollback("organ")


def test_delete_never_reuses_numbers_and_refuses_the_active_version(tmp_path, files, curve):
    root = tmp_path / "registry"
    registry = DecoderRegistry(root)
    registry.register(files[0], curve_png=curve)
    registry.register(files[1])
    with pytest.raises(RegistryConflict, match="v2 is the active version of 'organ'.*v1"):
        registry.delete("organ", "v2")
    state = registry.delete("organ", "v1")
    assert [v.version for v in state.versions] == ["v2"] and state.history == ()
    assert sorted(p.name for p in (root / "organ").iterdir()) == ["v2.safetensors", "versions.json"]
    assert registry.register(files[0], activate=False).version == "v3"
    registry.delete("organ", "v3")
    state = registry.delete("organ", "v2")          # the only version, active: the structure goes
    assert state.versions == () and state.active is None
    assert registry.structures() == [] and registry.active_paths() == {}
    with pytest.raises(UnknownVersion, match="no decoder structure 'organ'"):
        registry.state("organ")
    assert registry.register(files[0]).version == "v4"


def test_unknown_and_invalid_input(tmp_path, files, curve):
    registry = DecoderRegistry(tmp_path / "registry")
    registry.register(files[0])
    for call in (lambda: registry.state("liver"), lambda: registry.record("organ", "v9"),
                 lambda: registry.activate("organ", "v2"), lambda: registry.delete("organ", "v7"),
                 lambda: registry.state("../x"), lambda: registry.curve_path("organ", "nope")):
        with pytest.raises(UnknownVersion):
            call()
    before = sorted(p.name for p in (tmp_path / "registry" / "organ").iterdir())
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a decoder")
    with pytest.raises(CheckpointError, match="not a readable model file"):
        registry.register(junk)
    import torch

    from desam_server.modeling import build_desam, save_decoder

    torch.manual_seed(0)
    evidence = tmp_path / "ablation.safetensors"
    save_decoder(build_desam("tiny"), evidence, structure="organ", format="desam-decoder-no-fusion")
    with pytest.raises(CheckpointError, match="the ablation PDMM .* is not one the service serves"):
        registry.register(evidence)
    with pytest.raises(CheckpointError, match="not found"):
        registry.register(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a PNG"):
        registry.register(files[1], curve_png=files[1])
    reserved = decoder_files(tmp_path, "sam", 1)[0]
    with pytest.raises(CheckpointError, match="reserved"):
        registry.register(reserved)
    assert sorted(p.name for p in (tmp_path / "registry" / "organ").iterdir()) == before
    assert registry.structures() == ["organ"] and [v.version for v in registry.versions("organ")] == ["v1"]


def test_default_directory_follows_xdg(monkeypatch):
    assert default_registry_dir({"XDG_DATA_HOME": "/data"}) == Path("/data/slicer-desam/decoders")
    assert default_registry_dir({"XDG_DATA_HOME": "relative"}) == (
        Path.home() / ".local" / "share" / "slicer-desam" / "decoders")  # the XDG spec ignores relative paths
    assert default_registry_dir({}) == Path.home() / ".local" / "share" / "slicer-desam" / "decoders"


# ---- processes ---------------------------------------------------------------------------------
WRITER = textwrap.dedent("""
    import random, sys
    from desam_server.decoder_registry import DecoderRegistry, RegistryConflict
    root, source, curve, seed, count = sys.argv[1:6]
    registry, rng = DecoderRegistry(root), random.Random(int(seed))
    print("ready", flush=True)
    for _ in range(int(count) if int(count) > 0 else 10**9):
        info = registry.register(source, curve_png=curve if rng.random() < 0.5 else None,
                                 activate=rng.random() < 0.7)
        if int(count) > 0:
            continue
        state = registry.state(info.structure)
        if rng.random() < 0.3 and state.history:
            registry.rollback(info.structure)
            state = registry.state(info.structure)
        while len(state.versions) > 2:   # keep the disk small: delete the oldest inactive version
            oldest = next(v.version for v in state.versions if v.version != state.active)
            state = registry.delete(info.structure, oldest)
""")


def _writer(root: Path, source: Path, curve: Path, seed: int, count: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(source), str(curve), str(seed), str(count)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def _check_consistent(root: Path) -> tuple[dict[int, float], int]:
    """Open the registry (which tidies it) and check every listed version in full; the
    versions listed (number -> registration time) and the highest number handed out."""
    registry = DecoderRegistry(root)
    numbers, last = {}, 0
    for structure in registry.structures():
        state = registry.state(structure)
        listed = {v.version for v in state.versions}
        assert state.active is None or state.active in listed
        assert set(state.history) <= listed
        assert max(v.number for v in state.versions) <= state.last_number
        for info in state.versions:
            data = registry.path(structure, info.version).read_bytes()
            assert hashlib.sha256(data).hexdigest() == info.sha256 and len(data) == info.size_bytes
            assert read_decoder(registry.path(structure, info.version))[1] == registry.record(structure, info.version)
            assert (registry.curve_path(structure, info.version) is not None) == info.curve
            if info.curve:
                assert registry.curve_path(structure, info.version).read_bytes() == PNG
            numbers[info.number] = info.created
        last = state.last_number
        expected = {"versions.json", *(f"{v}.safetensors" for v in listed),
                    *(f"{v.version}.png" for v in state.versions if v.curve)}
        assert {p.name for p in (root / structure).iterdir()} == expected  # nothing half-written left
        json.loads((root / structure / "versions.json").read_text())
    return numbers, last


def test_writers_killed_at_random_moments_leave_no_half_version(tmp_path, files, curve):
    root = tmp_path / "registry"
    rng = random.Random(11)
    seen: dict[int, float] = {}
    last, leftovers = 0, 0
    for kill in range(6):
        proc = _writer(root, files[kill % 2], curve, kill, 0)
        time.sleep(rng.uniform(0.05, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        if (root / "organ").is_dir():
            leftovers += sum(1 for p in (root / "organ").iterdir() if p.name.startswith("."))
        numbers, now_last = _check_consistent(root)
        assert now_last >= last
        # A number is never handed out twice: one seen before is the same registration or gone.
        assert all(seen[n] == created for n, created in numbers.items() if n <= last), (seen, numbers)
        assert all(n not in seen for n in numbers if n > last)
        seen.update(numbers)
        last = now_last
    state = DecoderRegistry(root).state("organ")
    assert state.last_number >= 3, "the writers registered too little to test anything"
    print(f"{state.last_number} versions registered, {leftovers} temporary files left by kills and removed")


def test_concurrent_writers_lose_no_version(tmp_path, files, curve):
    root = tmp_path / "registry"
    procs = [_writer(root, files[n], curve, n, 2) for n in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    registry = DecoderRegistry(root)
    assert [v.version for v in registry.versions("organ")] == ["v1", "v2", "v3", "v4"]
    assert sorted(v.sha256 for v in registry.versions("organ")) == sorted(
        2 * [hashlib.sha256(p.read_bytes()).hexdigest() for p in files])
    _check_consistent(root)
