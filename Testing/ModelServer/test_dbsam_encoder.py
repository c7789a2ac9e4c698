"""DB-SAM's assembled encoder and its weights file: shapes, what trains, the frozen
encoder left bit-identical, activation checkpointing, save/load, strict refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from desam_server.modeling import CheckpointError, build_desam, get_spec
from desam_server.modeling.dbsam_checkpoint import (
    build_dbsam_encoder,
    dbsam_state_dict,
    dbsam_weights_sha256,
    load_dbsam,
    save_dbsam,
)
from desam_server.modeling.dbsam_encoder import DBSAMEncoder
from desam_server.modeling.dbsam_parameters import dbsam_block_parameters, dbsam_layout

SHA_A = "a" * 64


@pytest.fixture(scope="module")
def tiny_desam(tiny_sam_checkpoint):
    """A tiny DeSAM of its own (the session's ``tiny_model`` stays untouched)."""
    path, _ = tiny_sam_checkpoint
    return build_desam("tiny", sam_checkpoint=path)


@pytest.fixture(scope="module")
def lite_encoder():
    torch.manual_seed(1)
    encoder = get_spec("lite_medsam").make_encoder().requires_grad_(False).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that an update would show
        for name, buf in encoder.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
    return encoder


def _randomise(dbsam: DBSAMEncoder, seed: int = 0) -> DBSAMEncoder:
    """Give every trainable parameter non-trivial values (a fresh adapter is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dbsam.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return dbsam


def _image(encoder_name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    side = get_spec(encoder_name).convention.img_size
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert set(state) == set(snapshot)
    changed = [k for k, v in state.items() if not torch.equal(v, snapshot[k])]
    assert not changed, f"frozen tensors changed: {changed[:5]}"


# ------------------------------------------------------------------ structure

@pytest.mark.parametrize("name", ["vit_h", "vit_l", "vit_b", "mobile_sam", "lite_medsam", "tiny"])
def test_trainable_parameters_are_the_blocks_and_frozen_ones_the_encoder(name):
    """Built on the meta device (no memory): trainable = dbsam_block_parameters; frozen =
    exactly the base encoder's parameters, the same tensors (shared, not copied)."""
    with torch.device("meta"):
        base = get_spec(name).make_encoder().requires_grad_(False)
        dbsam = build_dbsam_encoder(base, encoder_name=name)
    trainable = [p for p in dbsam.parameters() if p.requires_grad]
    frozen = {id(p) for p in dbsam.parameters() if not p.requires_grad}
    assert sum(p.numel() for p in trainable) == dbsam_block_parameters(name).total
    assert {id(p) for p in dbsam.trainable_parameters()} == {id(p) for p in trainable}
    assert frozen == {id(p) for p in base.parameters()}
    layout = dbsam_layout(name)
    assert [len(a) for a in dbsam.adapters] == [len(s.blocks) for s in layout.stages]
    assert len(dbsam.cross_attention) == len(layout.stages)


def test_refuses_an_unfrozen_or_mismatched_encoder():
    with torch.device("meta"):
        base = get_spec("tiny").make_encoder()
        with pytest.raises(ValueError, match="must be frozen"):
            build_dbsam_encoder(base, encoder_name="tiny")
        base.requires_grad_(False)
        with pytest.raises(ValueError, match="does not fit DB-SAM's layout for 'vit_b'"):
            DBSAMEncoder(base, dbsam_layout("vit_b"))
        with pytest.raises(ValueError, match="registry name"):
            build_dbsam_encoder(base)


def test_accepts_segment_anythings_own_vit_encoder():
    from segment_anything.modeling import ImageEncoderViT

    kwargs = dict(get_spec("tiny").make_encoder.keywords)
    kwargs.pop("tap_blocks")
    with torch.device("meta"):
        base = ImageEncoderViT(**kwargs).requires_grad_(False)
        dbsam = build_dbsam_encoder(base, encoder_name="tiny")
    assert dbsam.family == "vit" and dbsam.image_encoder is base


def test_output_shape_equals_the_base_encoder_and_fresh_blocks_keep_vit_tokens(tiny_desam):
    dbsam = build_dbsam_encoder(tiny_desam).eval()
    assert dbsam.encoder_weights_sha256 == tiny_desam.encoder_weights_sha256 is not None
    x = _image("tiny")
    with torch.no_grad():
        out = dbsam(x)
        base, _ = tiny_desam.image_encoder(x)
    assert out.shape == base.shape == (2, 256, 16, 16)
    assert torch.isfinite(out).all()
    assert dbsam.image_encoder is tiny_desam.image_encoder


# ------------------------------------------------------------------ training

def _train_steps(dbsam: DBSAMEncoder, x: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.AdamW(dbsam.trainable_parameters(), lr=1e-3)
    dbsam.train()
    losses = []
    for _ in range(steps):
        loss = (dbsam(x) - 0.5).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_frozen_vit_stays_bit_identical_and_the_blocks_train(tiny_desam):
    before = _snapshot(tiny_desam)
    dbsam = build_dbsam_encoder(tiny_desam)
    start = {k: v.clone() for k, v in dbsam_state_dict(dbsam).items()}
    torch.manual_seed(0)
    _train_steps(dbsam, _image("tiny"), 3)
    _assert_unchanged(tiny_desam, before)
    assert not tiny_desam.image_encoder.training
    assert all(p.grad is None for p in tiny_desam.parameters())
    after = dbsam_state_dict(dbsam)
    params = {f"{part}.{k}" for part, m in dbsam.trainable_modules().items() for k, _ in m.named_parameters()}
    unchanged = [k for k in params if torch.equal(after[k], start[k])]
    assert not unchanged, f"trainable parameters not updated: {unchanged[:5]}"


def test_frozen_tiny_vit_keeps_its_batch_norm_statistics(lite_encoder):
    """TinyViT is full of batch norms: DB-SAM's train() must leave them in eval mode."""
    before = _snapshot(lite_encoder)
    dbsam = build_dbsam_encoder(lite_encoder, encoder_name="lite_medsam")
    x = _image("lite_medsam", batch=1)
    torch.manual_seed(0)
    _train_steps(dbsam, x, 1)
    _assert_unchanged(lite_encoder, before)
    with torch.no_grad():
        out = dbsam.eval()(x)
    assert out.shape == lite_encoder(x)[0].shape == (1, 256, 64, 64)


@pytest.mark.parametrize("family", ["vit", "tiny_vit"])
def test_activation_checkpointing_gives_the_same_output_and_gradients(family, tiny_desam, lite_encoder):
    if family == "vit":
        dbsam, x = _randomise(build_dbsam_encoder(tiny_desam)), _image("tiny")
    else:
        dbsam = _randomise(build_dbsam_encoder(lite_encoder, encoder_name="lite_medsam"))
        x = _image("lite_medsam", batch=1)
    results = []
    for flag in (False, True):
        dbsam.checkpoint_stages = flag
        dbsam.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same drop-path draws in both runs
        out = dbsam.train()(x)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in dbsam.named_parameters() if p.requires_grad}))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-6)
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6, msg=name)


def test_eval_is_deterministic_and_train_mode_drops_adapter_paths(tiny_desam):
    dbsam = _randomise(build_dbsam_encoder(tiny_desam))
    x = _image("tiny", batch=4)
    with torch.no_grad():
        first, second = dbsam.eval()(x), dbsam(x)
        torch.manual_seed(0)
        trained = dbsam.train()(x)
    assert torch.equal(first, second)
    assert not torch.allclose(trained, first)


# ------------------------------------------------------------------ weights file

def test_save_load_round_trip_is_bit_equal(tiny_desam, tmp_path):
    dbsam = _randomise(build_dbsam_encoder(tiny_desam), seed=5)
    torch.manual_seed(0)
    _train_steps(dbsam, _image("tiny"), 1)  # batch-norm statistics of the conv branch move too
    path = tmp_path / "dbsam.safetensors"
    meta = save_dbsam(dbsam, path, metadata={"epochs": 1})
    stored = json.loads(json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
                        ["__metadata__"]["dbsam"])
    assert stored == meta
    assert meta["format"] == "dbsam-encoder" and meta["encoder"] == "tiny" and meta["metadata"] == {"epochs": 1}
    assert meta["encoder_weights_sha256"] == tiny_desam.encoder_weights_sha256
    assert meta["dbsam_weights_sha256"] == dbsam_weights_sha256(load_file(path))
    tensors = load_file(path)
    assert {k.split(".", 1)[0] for k in tensors} == {"adapters", "conv_branch", "cross_attention", "fusion"}
    assert not any(k.startswith("image_encoder") for k in tensors)

    fresh = build_dbsam_encoder(tiny_desam)
    assert dbsam_weights_sha256(dbsam_state_dict(fresh)) != meta["dbsam_weights_sha256"]
    assert load_dbsam(fresh, path) == meta
    assert dbsam_weights_sha256(dbsam_state_dict(fresh)) == meta["dbsam_weights_sha256"]
    x = _image("tiny", seed=9)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), dbsam.eval()(x))


def _write_variant(src, dst, change) -> None:
    raw = src.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    tensors = load_file(src)
    change(tensors)
    save_file(tensors, dst, metadata=header["__metadata__"])


def test_load_refuses_wrong_encoder_and_missing_or_extra_keys(tiny_desam, tmp_path):
    dbsam = build_dbsam_encoder(tiny_desam)
    path = tmp_path / "dbsam.safetensors"
    save_dbsam(dbsam, path, metadata={})
    target = build_dbsam_encoder(tiny_desam)
    before = dbsam_state_dict(target)

    with torch.device("meta"):
        lite = build_dbsam_encoder(get_spec("lite_medsam").make_encoder().requires_grad_(False),
                                   encoder_name="lite_medsam")
    with pytest.raises(CheckpointError, match="trained for encoder 'tiny', this encoder is 'lite_medsam'"):
        load_dbsam(lite, path)
    other_weights = build_dbsam_encoder(tiny_desam, encoder_weights_sha256=None)
    other_weights.encoder_weights_sha256 = SHA_A
    with pytest.raises(CheckpointError, match=f"this encoder's weights are {SHA_A}"):
        load_dbsam(other_weights, path)
    other_shape = build_dbsam_encoder(tiny_desam, num_points=2)
    with pytest.raises(CheckpointError, match="num_points 4 in the file, 2 here"):
        load_dbsam(other_shape, path)

    missing = tmp_path / "missing.safetensors"
    _write_variant(path, missing, lambda t: t.pop("fusion.deep_attention.up.bias"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: fusion\.deep_attention\.up\.bias"):
        load_dbsam(target, missing)
    extra = tmp_path / "extra.safetensors"
    _write_variant(path, extra, lambda t: t.update({"fusion.spatial_gate.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys: fusion\.spatial_gate\.weight"):
        load_dbsam(target, extra)
    reshaped = tmp_path / "reshaped.safetensors"
    _write_variant(path, reshaped, lambda t: t.update({"fusion.deep_attention.up.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"fusion\.deep_attention\.up\.bias \(7,\)"):
        load_dbsam(target, reshaped)
    not_dbsam = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, not_dbsam)
    with pytest.raises(CheckpointError, match="not a readable DB-SAM weights file"):
        load_dbsam(target, not_dbsam)
    after = dbsam_state_dict(target)
    assert all(torch.equal(after[k], before[k]) for k in before)
