"""Labels of uploaded volumes (training data): the store, the service's rules, the HTTP routes
and the stdlib client's methods."""

from __future__ import annotations

import logging
import os
import urllib.parse
from dataclasses import replace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from desam_server import wire
from desam_server.api import create_app
from desam_server.api.errors import NotFound, Unprocessable
from desam_server.api.label_store import LabelStore, check_structure, structure_file_name
from desam_server.api.volume_store import VolumeStore
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError

from service_helpers import (
    DIRECTION,
    ORIGIN,
    SPACING,
    id_of,
    live_server,
    payload_of,
    phantom_volume,
    tiny_factory,
    tiny_settings,
)

VID = "ab" * 32


def blob(shape=(6, 48, 64), seed=0) -> np.ndarray:
    """A non-empty bool label: a box on slices 1..3 plus a few random voxels on slice 4."""
    mask = np.zeros(shape, bool)
    mask[1:4, 10:20, 30:45] = True
    r = np.random.default_rng(seed)
    mask[4, r.integers(0, shape[1], 5), r.integers(0, shape[2], 5)] = True
    return mask


def label_path(vid: str, structure: str) -> str:
    return f"/volumes/{vid}/labels/{urllib.parse.quote(structure, safe='')}"


# ---- the store --------------------------------------------------------------------------------------

def test_structure_names_and_their_file_names():
    for name in ("liver", "Left kidney", "Kidney (L)", "T1+T2, part 3", "a", "x" * 64, "Segment_1.v2-b"):
        assert check_structure(name) == name
    for bad in ("", " liver", "liver ", "-x", ".hidden", "a/b", "..", "x" * 65, "Lungenflügel", "a\nb", "a\\b"):
        with pytest.raises(Unprocessable, match="is not usable: 1 to 64 ASCII letters"):
            check_structure(bad)
    assert structure_file_name("liver") == "liver.mask"
    assert structure_file_name("Left kidney") == "%4Ceft%20kidney.mask"
    # Distinct names never share a file, even on a case-insensitive file system.
    names = ["Liver", "liver", "LIVER", "liver ", "Left kidney", "left kidney", "Left_kidney"]
    folded = {structure_file_name(n).lower() for n in names if n.strip() == n}
    assert len(folded) == len([n for n in names if n.strip() == n])


def test_store_roundtrip_listing_and_deletion(tmp_path):
    store = LabelStore(tmp_path / "labels")
    mask = blob()
    info, created = store.put(VID, "Left kidney", mask)
    assert created and info.voxels == int(mask.sum()) and info.shape == mask.shape
    assert info.slices == {"k": 4, "j": int(mask.any(axis=(0, 2)).sum()), "i": int(mask.any(axis=(0, 1)).sum())}
    assert info.extent["k"] == (1, 4)
    got = store.get(VID, "Left kidney")
    assert got.dtype == np.bool_ and np.array_equal(got, mask)
    path = tmp_path / "labels" / VID / "%4Ceft%20kidney.mask"
    assert path.read_bytes() == store.payload(VID, "Left kidney") and info.bytes == path.stat().st_size
    decoded = wire.decode_mask(path.read_bytes())
    assert decoded.header["volume_id"] == VID and decoded.axis == "k" and decoded.offset == 0
    # Replace, list, cases.
    _, created = store.put(VID, "Left kidney", ~mask)
    assert not created and np.array_equal(store.get(VID, "Left kidney"), ~mask)
    store.put(VID, "liver", mask)
    assert [i.structure for i in store.list(VID)] == ["Left kidney", "liver"]
    assert store.cases() == [(VID, "Left kidney"), (VID, "liver")] and store.cases("liver") == [(VID, "liver")]
    assert store.volumes() == [VID] and store.has_labels(VID)
    # Empty and malformed masks are refused.
    with pytest.raises(Unprocessable, match="the label of spleen is empty"):
        store.put(VID, "spleen", np.zeros((6, 48, 64), bool))
    with pytest.raises(Unprocessable, match="bool K x J x I"):
        store.put(VID, "spleen", mask.astype(np.uint8))
    assert store.delete(VID, "liver") and not store.delete(VID, "liver")
    with pytest.raises(NotFound, match="has no label of liver"):
        store.get(VID, "liver")
    assert store.delete_volume(VID) == 1 and not store.has_labels(VID) and not (tmp_path / "labels" / VID).exists()


def test_store_in_memory_without_a_directory():
    store = LabelStore(None)
    store.put(VID, "liver", blob())
    assert np.array_equal(store.get(VID, "liver"), blob()) and store.stats()["disk"] is False


def test_store_writes_atomically(tmp_path, monkeypatch):
    """A write that fails midway leaves the old label intact and no temporary file behind."""
    store = LabelStore(tmp_path)
    store.put(VID, "liver", blob())
    before = (tmp_path / VID / "liver.mask").read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.put(VID, "liver", ~blob())
    monkeypatch.undo()
    assert os.listdir(tmp_path / VID) == ["liver.mask"]
    assert (tmp_path / VID / "liver.mask").read_bytes() == before
    assert np.array_equal(store.get(VID, "liver"), blob())
    # An interrupted write from an earlier run (a temporary file) is cleaned up at start.
    (tmp_path / VID / ".liver.mask.x1y2.tmp").write_bytes(b"partial")
    LabelStore(tmp_path)
    assert os.listdir(tmp_path / VID) == ["liver.mask"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "other volume", "garbage"])
def test_a_damaged_file_is_dropped_and_reads_as_missing(tmp_path, caplog, damage):
    store = LabelStore(tmp_path)
    store.put(VID, "Left kidney", blob())
    path = tmp_path / VID / structure_file_name("Left kidney")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
    elif damage == "truncate":
        data = data[:-5]
    elif damage == "other volume":
        data = bytearray(wire.encode_mask(blob(), axis="k", offset=0, volume_id="cd" * 32))
    else:
        data = bytearray(b"not a payload at all")
    path.write_bytes(bytes(data))
    store = LabelStore(tmp_path)                    # after a restart: known, not yet read
    assert store.structures(VID) == ["Left kidney"]
    with caplog.at_level(logging.WARNING), pytest.raises(NotFound, match="was damaged .* send it again"):
        store.get(VID, "Left kidney")
    assert not path.exists() and store.list(VID) == [] and store.stats()["corrupt_files"] == 1
    assert VID not in caplog.text and VID[:12] in caplog.text and "kidney" not in caplog.text


def test_a_read_only_store_changes_nothing(tmp_path):
    """What a training job's process opens: it reads labels, never writes, cleans or drops."""
    store = LabelStore(tmp_path)
    store.put(VID, "liver", blob())
    store.put(VID, "spleen", blob())
    temp = tmp_path / VID / ".liver.mask.abc.tmp"                  # the service writing right now
    temp.write_bytes(b"in progress")
    reader = LabelStore(tmp_path, read_only=True)
    assert temp.exists() and reader.cases() == [(VID, "liver"), (VID, "spleen")]
    assert np.array_equal(reader.get(VID, "liver"), blob())
    with pytest.raises(PermissionError):
        reader.put(VID, "liver", blob())
    with pytest.raises(PermissionError):
        reader.delete_volume(VID)
    path = tmp_path / VID / "spleen.mask"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(NotFound, match="is damaged"):
        reader.get(VID, "spleen")
    assert path.exists() and LabelStore(tmp_path / "absent", read_only=True).cases() == []
    assert not (tmp_path / "absent").exists()


def test_volumes_with_labels_leave_the_disk_last(tmp_path):
    """The disk budget evicts volumes without labels first; a labelled volume's labels stay
    when it has to go anyway, and come back with the volume's next upload."""
    labels = LabelStore(tmp_path / "labels")
    vols = [phantom_volume(seed=s) for s in range(4)]
    ids = [id_of(v) for v in vols]
    sizes = [len(payload_of(v)) for v in vols]
    store = VolumeStore(tmp_path, disk_bytes=2 * max(sizes) + min(sizes) // 2, memory_bytes=1 << 30,
                        max_voxels=1 << 20, keep_longer=labels.has_labels)
    store.put(payload_of(vols[0]))
    labels.put(ids[0], "organ", blob())
    store.put(payload_of(vols[1]))
    store.put(payload_of(vols[2]))            # the oldest unlabelled one (1) goes, not the labelled 0
    assert [store.on_disk(i) for i in ids[:3]] == [True, False, True]
    labels.put(ids[2], "organ", blob())
    store.put(payload_of(vols[3]))            # only labelled ones left: the least recently used goes
    assert [store.on_disk(i) for i in ids] == [False, False, True, True]
    assert labels.cases() == sorted([(ids[0], "organ"), (ids[2], "organ")])


# ---- the service over HTTP ----------------------------------------------------------------------------

@pytest.fixture()
def app_client(tmp_path, tiny_sam_checkpoint):
    app = create_app(tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False), tiny_factory)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def put(client, vid, structure, mask=None, *, payload=None, **kw):
    if payload is None:
        payload = wire.encode_mask(blob() if mask is None else mask, axis="k", offset=0, **kw)
    return client.put(label_path(vid, structure), content=payload)


def test_labels_over_http(app_client, caplog):
    c = app_client
    vol = phantom_volume()
    vid = c.post("/volumes", content=payload_of(vol)).json()["volume_id"]
    assert c.get(f"/volumes/{vid}/labels").json() == {"volume_id": vid, "volume_available": True, "labels": []}
    with caplog.at_level(logging.DEBUG):
        r = put(c, vid, "Left kidney", volume_id=vid)
    assert r.status_code == 201, r.text
    assert r.headers["location"] == f"/volumes/{vid}/labels/Left%20kidney"
    info = r.json()
    assert info["structure"] == "Left kidney" and info["voxels"] == int(blob().sum()) and info["slices"]["k"] == 4
    assert info["extent"]["k"] == [1, 4] and info["shape"] == [6, 48, 64]
    ours = [rec.getMessage() for rec in caplog.records if rec.name.startswith("desam_server")]
    assert any(vid[:12] in m for m in ours) and not any(vid in m or "kidney" in m for m in ours)
    assert put(c, vid, "Left kidney").status_code == 200            # a replacement; no volume_id in the payload
    got = c.get(label_path(vid, "Left kidney"))
    assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
    decoded = wire.decode_mask(got.content)
    assert np.array_equal(decoded.mask, blob()) and decoded.header["volume_id"] == vid
    listed = c.get(f"/volumes/{vid}/labels").json()
    assert [label["structure"] for label in listed["labels"]] == ["Left kidney"]
    assert c.get("/info").json()["labels"]["labels"] == 1
    # The Python accessor a training job uses.
    service = c.app.state.service
    assert service.labels.cases() == [(vid, "Left kidney")]
    assert np.array_equal(service.labels.get(vid, "Left kidney"), blob())
    assert c.delete(label_path(vid, "Left kidney")).status_code == 204
    r = c.delete(label_path(vid, "Left kidney"))
    assert r.status_code == 404 and r.json()["detail"] == f"volume {vid[:12]} has no label of Left kidney"
    assert c.get(label_path(vid, "Left kidney")).status_code == 404


def test_bad_labels_are_refused_with_clear_messages(app_client):
    c = app_client
    vid = c.post("/volumes", content=payload_of(phantom_volume())).json()["volume_id"]
    unknown = "0" * 64

    def refused(r, status, text):
        assert r.status_code == status, r.text
        assert text in r.json()["detail"], r.json()["detail"]

    refused(put(c, unknown, "liver"), 404, "unknown volume 000000000000: upload it first")
    refused(put(c, vid, "liver", np.ones((6, 48, 63), bool)), 422,
            "the label's shape (6, 48, 63) does not match the volume's shape (6, 48, 64) (K x J x I)")
    refused(put(c, vid, "liver", np.ones((48, 64), bool)), 422, "the label's shape (48, 64) does not match")
    refused(put(c, vid, "liver", np.zeros((6, 48, 64), bool)), 422, "the label of liver is empty")
    refused(put(c, vid, "liver", volume_id=unknown), 422,
            f"the label payload belongs to volume 000000000000, not to volume {vid[:12]}")
    j_slab = wire.encode_mask(np.ones((48, 6, 64), bool), axis="j", offset=0)
    refused(put(c, vid, "liver", payload=j_slab), 422, "a label is the whole volume along axis 'k' at offset 0")
    refused(put(c, vid, "liver", payload=b"DESAMMSK garbage"), 422, "label payload rejected: ")
    refused(put(c, vid, "liver", payload=payload_of(phantom_volume())), 422, "not a mask payload")
    refused(put(c, vid, "liver", payload=b""), 400, "empty body: send a wire mask payload")
    refused(put(c, vid, "liver ", blob()), 422, "structure name 'liver ' is not usable")
    refused(c.get(label_path(vid, "a%b")), 422, "is not usable")
    assert c.get(f"/volumes/{vid}/labels").json()["labels"] == []
    refused(c.get(f"/volumes/{unknown}/labels"), 404, "unknown volume 000000000000")


def test_label_too_large(tmp_path, tiny_sam_checkpoint):
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False)
    with TestClient(create_app(replace(settings, max_upload_bytes=400), tiny_factory)) as c:
        vid = c.post("/volumes", content=payload_of(phantom_volume()[:1, :4, :4])).json()["volume_id"]
        noisy = np.random.default_rng(0).random((1, 64, 64)) < 0.5       # incompressible: > 400 bytes
        r = put(c, vid, "liver", noisy, compression="none")
        assert r.status_code == 413 and "exceeds the limit of 400 bytes" in r.json()["detail"]


def test_labels_persist_across_a_restart_and_go_with_their_volume(tmp_path, tiny_sam_checkpoint):
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False)
    vol = phantom_volume()
    with TestClient(create_app(settings, tiny_factory)) as c:
        vid = c.post("/volumes", content=payload_of(vol)).json()["volume_id"]
        assert put(c, vid, "Left kidney").status_code == 201
        assert put(c, vid, "liver", ~blob()).status_code == 201
    with TestClient(create_app(settings, tiny_factory)) as c:       # a new service on the same volume_dir
        listed = c.get(f"/volumes/{vid}/labels").json()
        assert [label["structure"] for label in listed["labels"]] == ["Left kidney", "liver"]
        assert listed["labels"][1]["voxels"] == int((~blob()).sum())
        assert np.array_equal(wire.decode_mask(c.get(label_path(vid, "liver")).content).mask, ~blob())
        assert c.delete(f"/volumes/{vid}").status_code == 204
        assert c.get(f"/volumes/{vid}/labels").status_code == 404
        assert not (tmp_path / "volumes" / "labels" / vid).exists()


def test_labels_stay_when_their_volume_leaves_the_disk(tmp_path, tiny_sam_checkpoint):
    """A volume gone from the service (disk budget) keeps its labels: listed as unavailable,
    readable, deletable with DELETE /volumes/{id}; the same volume uploaded again has them."""
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False)
    vol = phantom_volume()
    with TestClient(create_app(settings, tiny_factory)) as c:
        vid = c.post("/volumes", content=payload_of(vol)).json()["volume_id"]
        assert put(c, vid, "liver").status_code == 201
    os.unlink(tmp_path / "volumes" / f"{vid}.vol")                  # as the disk budget would
    with TestClient(create_app(settings, tiny_factory)) as c:
        listed = c.get(f"/volumes/{vid}/labels").json()
        assert listed["volume_available"] is False and listed["labels"][0]["structure"] == "liver"
        r = put(c, vid, "spleen")
        assert r.status_code == 404 and "upload it first" in r.json()["detail"]
        assert c.post("/volumes", content=payload_of(vol)).status_code == 201
        assert c.get(f"/volumes/{vid}/labels").json()["volume_available"] is True
        c.app.state.service.store.delete(vid)
        assert c.delete(f"/volumes/{vid}").status_code == 204          # the labels alone
        assert c.get(f"/volumes/{vid}/labels").status_code == 404


# ---- the stdlib client ---------------------------------------------------------------------------------

def test_client_label_methods(tmp_path, tiny_sam_checkpoint):
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], decoder=False)
    vol = phantom_volume()
    with live_server(settings) as (url, _):
        client = ServerClient(url)
        vid, _ = client.upload_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
        info = client.put_label(vid, "Kidney (L)", blob())
        assert info["structure"] == "Kidney (L)" and info["voxels"] == int(blob().sum())
        listed = client.list_labels(vid)
        assert listed["volume_available"] and [x["structure"] for x in listed["labels"]] == ["Kidney (L)"]
        got = client.get_label(vid, "Kidney (L)")
        assert got.dtype == np.bool_ and np.array_equal(got, blob())
        with pytest.raises(ServerError) as exc:
            client.put_label(vid, "Kidney (L)", np.zeros(vol.shape, bool))
        assert exc.value.status == 422 and "the label of Kidney (L) is empty" in str(exc.value)
        client.delete_label(vid, "Kidney (L)")
        with pytest.raises(ServerError) as exc:
            client.get_label(vid, "Kidney (L)")
        assert exc.value.status == 404
        client.close()
