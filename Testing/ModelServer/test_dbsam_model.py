"""DB-SAM's ablation switches in the encoder, the DB-SAM model beside a base DeSAM (shared
frozen parts, its own mask decoder, its own encoder identity) and its model file
(``dbsam-model``): save/load and the strict refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from desam_server.modeling import CheckpointError, build_desam, get_spec
from desam_server.modeling.checkpoint import read_decoder, save_decoder
from desam_server.modeling.dbsam_checkpoint import build_dbsam_encoder, dbsam_weights_sha256, load_dbsam, save_dbsam
from desam_server.modeling.dbsam_cross_attention import DeformableCrossAttentionLayer
from desam_server.modeling.dbsam_encoder import TRAINABLE_PARTS, dbsam_parts
from desam_server.modeling.dbsam_file import load_dbsam_model, read_dbsam_model, save_dbsam_model
from desam_server.modeling.dbsam_model import DBSAM, build_dbsam_model
from desam_server.modeling.dbsam_parameters import dbsam_block_parameters

VARIANTS = {"full": {}, "no_fusion": {"with_fusion": False},
            "adapters": {"with_branch": False, "with_fusion": False}}


@pytest.fixture(scope="module")
def base(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    return build_desam("tiny", sam_checkpoint=path)


def _randomise(model: DBSAM, seed: int) -> DBSAM:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.weights_changed()
    return model


def _image(seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 256, 256, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the ablation switches

def test_parts_of_the_variants():
    assert dbsam_parts() == TRAINABLE_PARTS
    assert dbsam_parts(with_fusion=False) == ("adapters", "conv_branch", "cross_attention")
    assert dbsam_parts(with_branch=False, with_fusion=False) == ("adapters",)
    with pytest.raises(ValueError, match="needs with_branch"):
        dbsam_parts(with_branch=False)


@pytest.mark.parametrize("name", ["vit_b", "mobile_sam"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_trainable_parameters_of_each_variant_are_its_parts(name, variant):
    with torch.device("meta"):
        encoder = build_dbsam_encoder(get_spec(name).make_encoder().requires_grad_(False), encoder_name=name,
                                      **VARIANTS[variant])
    counts = dbsam_block_parameters(name)
    expected = sum(getattr(counts, p) for p in encoder.parts)
    if variant == "no_fusion":  # the last stage's shallow <- deep layer is left out: nothing reads it
        layout = encoder.layout
        with torch.device("meta"):
            layer = DeformableCrossAttentionLayer(layout.shallow_dim, layout.stages[-1].dim,
                                                  num_heads=layout.shallow_heads)
        expected -= sum(p.numel() for p in layer.parameters())
        assert encoder.cross_attention[-1].shallow_from_deep is None
    assert sum(p.numel() for p in encoder.trainable_parameters()) == expected
    assert sum(p.numel() for p in encoder.parameters() if p.requires_grad) == sum(
        p.numel() for p in encoder.trainable_parameters())


def test_the_full_model_is_built_and_saved_as_before(base, tmp_path):
    """The switches change nothing for the full model: the same random initialisation
    (the parts are created in the same order) and a weights file without a parts entry."""
    torch.manual_seed(3)
    full = build_dbsam_encoder(base)
    torch.manual_seed(3)
    again = build_dbsam_encoder(base, with_branch=True, with_fusion=True)
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    meta = save_dbsam(full, tmp_path / "full.safetensors")
    assert "parts" not in meta and sorted({k.split(".")[0] for k in load_file(tmp_path / "full.safetensors")}) == \
        sorted(TRAINABLE_PARTS)
    adapters = build_dbsam_encoder(base, with_branch=False, with_fusion=False)
    assert save_dbsam(adapters, tmp_path / "adapters.safetensors")["parts"] == ["adapters"]
    with pytest.raises(CheckpointError, match="hold the parts adapters; this encoder has adapters, conv_branch"):
        load_dbsam(full, tmp_path / "adapters.safetensors")
    with pytest.raises(CheckpointError, match="parts adapters, conv_branch, cross_attention, fusion; this encoder"):
        load_dbsam(adapters, tmp_path / "full.safetensors")


@pytest.mark.parametrize("variant", ["adapters", "no_fusion"])
def test_variants_give_an_embedding_and_checkpoint_equally(base, variant):
    torch.manual_seed(0)
    plain = _randomise(build_dbsam_model(base, checkpoint_stages=False, **VARIANTS[variant]), 1)
    torch.manual_seed(0)
    checkpointed = _randomise(build_dbsam_model(base, checkpoint_stages=True, **VARIANTS[variant]), 1)
    x = _image(batch=1)
    outs, grads = [], []
    for model in (plain, checkpointed):
        model.train()
        torch.manual_seed(5)  # the same drop-path draws
        out = model.dbsam(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.dbsam.trainable_parameters()]))
    assert outs[0].shape == (1, 256, 16, 16)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_between_steps_is_called_after_the_branch_and_each_stage(base):
    calls = []
    model = build_dbsam_model(base)
    with torch.no_grad():
        model.encode(_image(), between_steps=lambda: calls.append(1))
    assert len(calls) == 1 + len(model.dbsam.layout.stages)


# ------------------------------------------------------------------ the model beside the base

def test_model_shares_the_frozen_parts_and_copies_the_mask_decoder(base):
    model = build_dbsam_model(base)
    assert model.dbsam.image_encoder is base.image_encoder and model.prompt_encoder is base.prompt_encoder
    assert model.mask_decoder is not base.mask_decoder
    for a, b in zip(model.mask_decoder.state_dict().values(), base.mask_decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert model.decoder_modules() == {} and not model.has_trained_decoder
    assert model.encoder_name == "tiny+dbsam" and not model.training
    model.train()  # the shared parts keep their mode
    assert model.mask_decoder.training and model.dbsam.fusion.training
    assert not base.prompt_encoder.training and not base.image_encoder.training
    model.eval()
    assert build_dbsam_model(base, with_branch=False, with_fusion=False).encoder_name == "tiny+dbsam[adapters]"
    with pytest.raises(TypeError, match="from a DeSAM base"):
        build_dbsam_model(model)


def test_fresh_models_are_the_same_and_leave_the_global_random_state_alone(base):
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    a = build_dbsam_model(base)
    b = build_dbsam_model(base)
    assert torch.equal(torch.rand(3), before)
    assert a.encoder_weights_sha256 == b.encoder_weights_sha256


def test_identity_follows_the_weights_and_differs_from_the_base(base):
    model = build_dbsam_model(base)
    first = model.encoder_weights_sha256
    assert len(first) == 64 and first != base.encoder_weights_sha256
    assert model.base_encoder_weights_sha256 == base.encoder_weights_sha256
    with torch.no_grad():
        model.dbsam.trainable_parameters()[-1].add_(0.01)
    assert model.encoder_weights_sha256 == first  # not yet told
    model.weights_changed()
    assert model.encoder_weights_sha256 != first
    with torch.no_grad():  # the mask decoder does not change the features
        second = model.encoder_weights_sha256
        next(model.mask_decoder.parameters()).add_(0.01)
    model.weights_changed()
    assert model.encoder_weights_sha256 == second
    with pytest.raises(AttributeError, match="derives from its weights"):
        model.encoder_weights_sha256 = "b" * 64


# ------------------------------------------------------------------ the model file

def test_model_file_round_trip(base, tmp_path):
    model = _randomise(build_dbsam_model(base), 2)
    path = tmp_path / "m.safetensors"
    meta = save_dbsam_model(model, path, structure=" liver ", training={"epochs": 1})
    assert meta["format"] == "dbsam-model" and meta["structure"] == "liver"
    assert meta["dbsam"]["features_sha256"] == model.encoder_weights_sha256
    assert meta["encoder"] == "tiny" and meta["encoder_weights_sha256"] == base.encoder_weights_sha256
    keys = load_file(path).keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "mask_decoder"}
    fresh = build_dbsam_model(base)
    assert fresh.encoder_weights_sha256 != model.encoder_weights_sha256
    load_dbsam_model(fresh, path)
    assert fresh.encoder_weights_sha256 == model.encoder_weights_sha256
    x = _image(4)
    with torch.no_grad():
        torch.testing.assert_close(fresh.encode(x)[0], model.encode(x)[0], rtol=0, atol=0)
    for a, b in zip(fresh.mask_decoder.state_dict().values(), model.mask_decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _rewrite(src, dst, *, tensors=None, meta=None, rehash=True) -> None:
    """A copy of a model file with its tensors and/or metadata changed; rehash: record the
    changed tensors' hash (a consistent file that does not fit), else keep the old one."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        stored = json.loads(f.metadata()["desam"])
    data = load_file(src)
    if tensors is not None:
        data = tensors(data)
    if meta is not None:
        meta(stored)
    if rehash:
        stored["weights_sha256"] = dbsam_weights_sha256(data)
    save_file(data, str(dst), metadata={"desam": json.dumps(stored)})


def test_model_file_refusals(base, tmp_path):
    model = _randomise(build_dbsam_model(base), 3)
    good = tmp_path / "good.safetensors"
    save_dbsam_model(model, good, structure="liver")
    target = build_dbsam_model(base)
    untouched = {k: v.clone() for k, v in target.state_dict().items()}

    def refused(path, match):
        with pytest.raises(CheckpointError, match=match):
            load_dbsam_model(target, path)

    refused(tmp_path / "none.safetensors", "not found")
    save_dbsam(model.dbsam, tmp_path / "encoder.safetensors")
    refused(tmp_path / "encoder.safetensors", "DB-SAM encoder weights file")
    save_decoder(base, tmp_path / "desam.safetensors", structure="liver")
    refused(tmp_path / "desam.safetensors", r"format 'desam-decoder' \(a DeSAM decoder\) is not 'dbsam-model'")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    refused(tmp_path / "junk.safetensors", "not a readable DB-SAM model file")

    def variant(name, **kw):
        path = tmp_path / f"{name}.safetensors"
        _rewrite(good, path, **kw)
        return path

    refused(variant("version", meta=lambda m: m.update(format_version=2)), "version 2 is not supported")
    refused(variant("tampered", rehash=False, tensors=lambda t: {
        **t, "mask_decoder.iou_token.weight": t["mask_decoder.iou_token.weight"] + 1}), "recorded weights_sha256")
    refused(variant("encoder", meta=lambda m: m.update(encoder="mobile_sam")), "trained on encoder 'mobile_sam'")
    refused(variant("weights", meta=lambda m: m.update(encoder_weights_sha256="a" * 64)),
            "trained on encoder weights a+")
    refused(variant("parts", meta=lambda m: m["dbsam"].update(parts=["adapters"])),
            "holds the DB-SAM parts adapters; this model has")
    refused(variant("hyper", meta=lambda m: m["dbsam"]["hyper_parameters"].update(num_points=8)),
            "num_points 8 in the file, 4 here")
    refused(variant("missing", tensors=lambda t: {k: v for k, v in t.items() if not k.startswith("encoder.fusion.")}),
            "missing keys: encoder.fusion")
    refused(variant("extra", tensors=lambda t: {**t, "mask_decoder.extra": torch.zeros(1)}),
            "unexpected keys: mask_decoder.extra")
    refused(variant("shape", tensors=lambda t: {**t, "mask_decoder.iou_token.weight": torch.zeros(2, 2)}),
            "wrong shape or type: mask_decoder.iou_token.weight")
    after = target.state_dict()
    assert all(torch.equal(after[k], v) for k, v in untouched.items())
    # The service's decoder reader refuses a DB-SAM model file with the reason.
    with pytest.raises(CheckpointError, match="'dbsam-model' \\(a DB-SAM model"):
        read_decoder(good)
    assert read_dbsam_model(good)[1]["structure"] == "liver"
