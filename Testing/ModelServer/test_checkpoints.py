"""Strict SAM checkpoint loading and the DeSAM decoder file format."""

from __future__ import annotations

import json

import pytest
import torch

from desam_server.modeling import CheckpointError, build_desam, load_decoder, save_decoder, sha256_file
from desam_server.modeling.checkpoint import read_decoder


def test_sam_checkpoint_loads_strictly_and_records_its_hash(tiny_sam_checkpoint):
    path, sam = tiny_sam_checkpoint
    model = build_desam("tiny", sam_checkpoint=path)
    ours = model.state_dict()
    for key, value in sam.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert model.encoder_weights_sha256 == sha256_file(path)


def test_missing_and_unexpected_keys_are_named(tiny_sam_checkpoint, tmp_path):
    path, sam = tiny_sam_checkpoint
    state = sam.state_dict()
    state.pop("mask_decoder.iou_token.weight")
    state["image_encoder.extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        build_desam("tiny", sam_checkpoint=bad)
    text = str(err.value)
    assert "missing keys: mask_decoder.iou_token.weight" in text
    assert "unexpected keys: image_encoder.extra.weight" in text


def test_wrong_shapes_truncation_and_hash_mismatch_give_clear_errors(tiny_sam_checkpoint, tmp_path):
    path, sam = tiny_sam_checkpoint
    state = sam.state_dict()
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    shaped = tmp_path / "shape.pth"
    torch.save(state, shaped)
    with pytest.raises(CheckpointError, match="mask_decoder does not fit"):
        build_desam("tiny", sam_checkpoint=shaped)

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read SAM checkpoint"):
        build_desam("tiny", sam_checkpoint=truncated)

    with pytest.raises(CheckpointError, match="does not match the expected"):
        build_desam("tiny", sam_checkpoint=path, sam_checkpoint_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="not found"):
        build_desam("tiny", sam_checkpoint=tmp_path / "nope.pth")
    not_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_dict)
    with pytest.raises(CheckpointError, match="flat state dict"):
        build_desam("tiny", sam_checkpoint=not_dict)


@pytest.fixture()
def decoder_file(tiny_sam_checkpoint, tmp_path):
    path, _ = tiny_sam_checkpoint
    model = build_desam("tiny", sam_checkpoint=path)
    with torch.no_grad():
        for p in model.pdmm.parameters():
            p.add_(0.01)
    out = tmp_path / "dec.safetensors"
    meta = save_decoder(model, out, structure="liver", training={"epochs": 3, "best_val_dice": 0.5})
    return model, out, meta


def test_decoder_round_trip_and_metadata(tiny_sam_checkpoint, decoder_file):
    model, out, meta = decoder_file
    path, _ = tiny_sam_checkpoint
    loaded = build_desam("tiny", sam_checkpoint=path, decoder_checkpoint=out)
    for name in ("prim", "pdmm"):
        pairs = zip(getattr(model, name).state_dict().items(), getattr(loaded, name).state_dict().items(), strict=True)
        for (k, a), (_, b) in pairs:
            assert torch.equal(a, b), f"{name}.{k}"
    assert loaded.has_trained_decoder
    tensors, stored = read_decoder(out)
    assert stored == meta
    assert all(k.startswith(("prim.", "pdmm.")) for k in tensors)  # never the encoder
    assert stored["encoder"] == "tiny" and stored["structure"] == "liver"
    assert stored["encoder_weights_sha256"] == sha256_file(path)
    assert stored["tap_indices"] == [1, 3, 5] and stored["tap_channels"] == [32, 32, 32]
    assert stored["input"]["img_size"] == 256 and stored["training"]["epochs"] == 3
    assert stored["format"] == "desam-decoder" and stored["format_version"] == 1


def test_decoder_mismatches_are_refused(tiny_sam_checkpoint, decoder_file, tmp_path):
    _, out, _ = decoder_file
    # Same architecture, different (random) encoder weights.
    with pytest.raises(CheckpointError, match="trained on encoder weights"):
        build_desam("tiny", decoder_checkpoint=out)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(out.read_bytes()[:-1000])
    path, _ = tiny_sam_checkpoint
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_desam("tiny", sam_checkpoint=path, decoder_checkpoint=truncated)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        build_desam("tiny", sam_checkpoint=path, decoder_checkpoint=garbage)


def _rewrite_meta(src, dst, **changes):
    from safetensors.torch import load_file, save_file

    tensors, meta = read_decoder(src)
    meta.update(changes)
    save_file(load_file(src), dst, metadata={"desam": json.dumps(meta)})


def test_decoder_for_another_encoder_or_version_is_refused(tiny_sam_checkpoint, decoder_file, tmp_path):
    path, _ = tiny_sam_checkpoint
    _, out, _ = decoder_file
    other = tmp_path / "other.safetensors"
    _rewrite_meta(out, other, encoder="vit_b")
    model = build_desam("tiny", sam_checkpoint=path)
    with pytest.raises(CheckpointError, match="trained for encoder 'vit_b'"):
        load_decoder(model, other)
    future = tmp_path / "future.safetensors"
    _rewrite_meta(out, future, format_version=99)
    with pytest.raises(CheckpointError, match="version 99 is not supported"):
        load_decoder(model, future)
    assert not model.has_trained_decoder


def test_decoder_save_is_atomic_and_needs_a_structure(decoder_file, tmp_path):
    model, out, _ = decoder_file
    with pytest.raises(ValueError, match="structure"):
        save_decoder(model, tmp_path / "x.safetensors", structure="  ")
    assert not (tmp_path / "x.safetensors").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
