"""The inference path is the caller's explicit choice, and what it derives from weights is
named, owned and renewed where weights change: checkpoint loading, an optimizer step
(``weights_changed``), another decoder version taking a name in the service."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_server.engine import SlicePredictor
from desam_server.modeling import FastPath, ImageFeatures, SliceDecoderState, build_desam, decoder_fast, save_decoder
from desam_server.modeling.checkpoint import load_decoder, load_sam_checkpoint
from desam_server.modeling.prim import PRIM

from decoder_helpers import embedding, tiny_model


@pytest.fixture(scope="module")
def model():
    m = tiny_model(11)
    torch.manual_seed(12)
    with torch.no_grad():
        for p in m.pdmm.parameters():
            p.normal_(0, 0.05)
    return m


def taps_for(model, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, c, s, s, generator=g) for c, s in
            zip(model.image_encoder.tap_channels, model.image_encoder.tap_sizes, strict=True)]


def click(model, batch: int = 1):
    g = torch.Generator().manual_seed(3)
    return torch.rand(batch, 2, 2, generator=g) * model.img_size, torch.tensor([[1, 0]]).repeat(batch, 1)


def test_training_and_inference_forwards_of_prim_and_pdmm_agree(model):
    """The training form (modules, autograd on) and the fast inference path give the same
    IoU and logits for the same inputs."""
    image, taps, points = embedding(model, 1), taps_for(model, 2), click(model, 3)
    iou_train, logits_train = model.desam_forward(image.expand(3, -1, -1, -1), [t.expand(3, -1, -1, -1) for t in taps],
                                                  points=points)
    assert logits_train.requires_grad  # a real training forward
    state = SliceDecoderState()
    with torch.inference_mode():
        skips = model.image_skips(taps)
        iou_fast, logits_fast = model.desam_decode(image, skips, points=points, fast=FastPath(), state=state)
    assert state.prim.first_block is not None  # it did take the fast path
    torch.testing.assert_close(iou_fast, iou_train.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_fast, logits_train.detach(), rtol=1e-4, atol=1e-4)


def test_the_training_form_never_runs_the_fast_path(model, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the fast path ran")

    for name in ("two_way_forward", "mask_decoder_forward", "_token_to_image", "_image_to_token", "_first_block"):
        monkeypatch.setattr(decoder_fast, name, forbidden)
    monkeypatch.setattr(PRIM, "infer", forbidden)
    image, taps, points = embedding(model, 4), taps_for(model, 5), click(model)
    for context in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with context():
            iou, logits = model.desam_forward(image, taps, points=points)
            sam = model.sam_decode(image, points=points, boxes=None, mask_input=None, multimask_output=True)
    iou, logits = model.desam_forward(image, taps, points=points)
    (iou.sum() + logits.mean()).backward()
    assert model.pdmm.head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    assert sam[0].shape[1] == 3


def test_the_fast_path_refuses_autograd(model):
    image = embedding(model, 6)
    with pytest.raises(RuntimeError, match="inference"):
        model.sam_decode(image, points=click(model), boxes=None, mask_input=None, multimask_output=False,
                         fast=FastPath())
    sparse, dense = model.prompt_encoder(points=click(model), boxes=None, masks=None)
    with pytest.raises(RuntimeError, match="inference"):
        model.run_prim(image, sparse.detach(), dense.detach(), fast=FastPath())


def fast_and_module(model, image, state):
    """(fast, module) PRIM answers and SAM decoder answers for one click."""
    points = click(model)
    with torch.inference_mode():
        sparse, dense = model.prompt_encoder(points=points, boxes=None, masks=None)
        prim_fast = model.run_prim(image, sparse, dense, fast=FastPath(), state=state)
        prim_module = model.run_prim(image, sparse, dense)
        args = dict(points=points, boxes=None, mask_input=None, multimask_output=True)
        sam_fast = model.sam_decode(image, fast=FastPath(), state=state, **args)
        sam_module = model.sam_decode(image, **args)
    return (prim_fast, prim_module), (sam_fast, sam_module)


def assert_paths_agree(pairs) -> None:
    for fast, module in pairs:
        for got, want in zip(fast, module, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


def test_loading_checkpoints_renews_the_derived_state(tiny_sam_checkpoint, tmp_path):
    """A decoder file and a SAM checkpoint loaded into a model that already answered
    prompts: new generation, the slice's state cleared on its next use, answers follow."""
    model = tiny_model(13)
    image, state = embedding(model, 7), SliceDecoderState()
    assert_paths_agree(fast_and_module(model, image, state))
    first = state.generation

    other = build_desam("tiny")
    torch.manual_seed(14)
    with torch.no_grad():
        for p in other.prim.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path / "other.safetensors"
    save_decoder(other, path, structure="other")
    load_decoder(model, path)
    assert model.generation != first
    assert_paths_agree(fast_and_module(model, image, state))
    assert state.generation == model.generation

    checkpoint, _ = tiny_sam_checkpoint
    before = model.generation
    load_sam_checkpoint(model, checkpoint)
    assert model.generation != before
    model.encoder_weights_sha256 = None
    assert_paths_agree(fast_and_module(model, image, state))


def test_an_optimizer_step_then_weights_changed_renews_the_derived_state():
    """Training changes weights in place: without ``weights_changed`` the fast path would
    still use the old positional projections (shown below); with it, it follows."""
    model = tiny_model(15)
    image, state = embedding(model, 8), SliceDecoderState()
    assert_paths_agree(fast_and_module(model, image, state))
    optimizer = torch.optim.Adam(model.prim.parameters(), lr=0.05)
    sparse, dense = model.prompt_encoder(points=click(model), boxes=None, masks=None)
    iou, mask_embedding = model.run_prim(image, sparse.detach(), dense.detach())
    (iou.sum() + mask_embedding.square().mean()).backward()
    optimizer.step()
    (stale_fast, module), _ = fast_and_module(model, image, state)
    assert not torch.allclose(stale_fast[1], module[1], atol=1e-3)  # stale constants: the call matters
    model.weights_changed()
    assert_paths_agree(fast_and_module(model, image, state))


def test_another_decoder_version_under_the_same_name_answers_in_the_service(tmp_path):
    """The service keeps clicked slices' features (and their decoder state) between
    prompts; a new version of a decoder loaded under the same name must not read the old
    version's slice state."""
    from dataclasses import replace

    from desam_server.api import ServiceSettings
    from desam_server.io.slices import slice_view

    from service_helpers import payload_of, phantom_volume, tiny_factory, tiny_settings

    settings = tiny_settings(tmp_path)
    # float32 features in the cache: the service's answer is then exactly the in-process one
    settings = replace(settings, volume_dir=None, cache=replace(settings.cache, storage_dtype="float32"))
    assert isinstance(settings, ServiceSettings)
    service = tiny_factory(settings)
    try:
        volume = phantom_volume()
        info, _ = service.upload(payload_of(volume))
        vid = info["volume_id"]
        prompt = dict(points=[[30.0, 24.0]], labels=[1], decoder="phantom", window={"center": 40, "width": 400})
        first = service.prompt(vid, "k", 2, **prompt)

        model = build_desam("tiny")
        torch.manual_seed(21)
        with torch.no_grad():
            for p in [*model.prim.parameters(), *model.pdmm.parameters()]:
                p.add_(0.2 * torch.randn_like(p))
        new_version = tmp_path / "phantom-v2.safetensors"
        save_decoder(model, new_version, structure="phantom")
        service.decoders.load(new_version, name="phantom")
        second = service.prompt(vid, "k", 2, **prompt)
        assert second["timing"]["cached"]  # the same hot slice features ...

        from desam_server import wire
        from desam_server.engine import IntensityWindow

        reference = SlicePredictor(service.decoders.get("phantom").model, precision="fp32")
        reference.set_image(slice_view(volume, "k", 2), IntensityWindow(center=40, width=400))
        want_mask, want_iou = reference.predict_desam(np.array([[30.0, 24.0]]), np.array([1]))
        import base64

        got = wire.decode_mask(base64.b64decode(second["masks"][0]["mask"])).mask
        assert second["masks"][0]["iou"] == pytest.approx(want_iou, abs=1e-4)  # ... the new version's answer
        assert (got != want_mask).mean() < 1e-3
        assert second["masks"][0]["iou"] != pytest.approx(first["masks"][0]["iou"], abs=1e-4)
    finally:
        service.close()


def test_slice_state_of_one_model_is_cleared_for_another():
    a, b = tiny_model(16), tiny_model(17)
    features = ImageFeatures(embedding=embedding(a, 9), taps=taps_for(a, 9), input_size=(256, 256),
                             original_size=(256, 256))
    pa, pb = SlicePredictor(a, precision="fp32"), SlicePredictor(b, precision="fp32")
    pa.set_features(features)
    pb.set_features(features)
    got_a = pa.predict(point_coords=[[100.0, 90.0]], point_labels=[1])
    assert features.decoder_state.generation == a.generation
    got_b = pb.predict(point_coords=[[100.0, 90.0]], point_labels=[1])
    assert features.decoder_state.generation == b.generation
    ref = SlicePredictor(b, precision="fp32", fast=None)
    ref.set_features(ImageFeatures(embedding=features.embedding, taps=features.taps, input_size=(256, 256),
                                   original_size=(256, 256)))
    want_b = ref.predict(point_coords=[[100.0, 90.0]], point_labels=[1])
    np.testing.assert_allclose(got_b[2], want_b[2], rtol=1e-4, atol=1e-3)
    assert not np.allclose(got_a[2], got_b[2], atol=1e-2)
