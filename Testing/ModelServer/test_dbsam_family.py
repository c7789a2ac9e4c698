"""DB-SAM trained through the training machinery (``run_training``): the frozen base stays
bit-identical, the loss falls, the ablation families train, the files load back, and the
servable (``engine.dbsam_serving``) answers a box as the family does, with an encoder
identity of its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_server.engine.dbsam_serving import load_servable
from desam_server.engine.predictor import SlicePredictor
from desam_server.modeling import CheckpointError, build_desam
from desam_server.training.config import TrainConfig
from desam_server.training.dbsam_family import DBSAMFamily, jittered_box, truth_box, whole_box
from desam_server.training.family import get_family
from desam_server.training.run import TrainingOptions, run_training
from desam_server.training.slice_images import SliceImageReader

from training_helpers import phantom_cases


def _options(family: str, epochs: int, slice_step: int = 1) -> TrainingOptions:
    config = TrainConfig(family=family, strategy="box", batch_size=2, epochs=epochs, learning_rate=1e-3,
                         precision="fp32")
    return TrainingOptions(validation_fraction=0.25, empty_ratio=0.5, slice_step=slice_step, config=config)


@pytest.fixture(scope="module")
def cases():
    return phantom_cases(3)


@pytest.fixture(scope="module")
def base(tiny_sam_checkpoint):
    path, _ = tiny_sam_checkpoint
    return build_desam("tiny", sam_checkpoint=path)


@pytest.fixture(scope="module")
def trained(base, cases, tmp_path_factory):
    """The full DB-SAM trained 2 epochs on the phantoms; the base's state before."""
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = tmp_path_factory.mktemp("dbsam-run")
    result = run_training(base, cases, _options("dbsam", 2), output_dir=out, resume=False)
    return result, before


def test_jittered_box_moves_each_side_outwards_within_20_of_1024():
    mask = np.zeros((200, 300), bool)
    mask[50:120, 100:180] = True
    x0, y0, x1, y1 = truth_box(mask)
    assert (x0, y0, x1, y1) == (100, 50, 180, 120)
    most = 20 * 300 / 1024
    boxes = np.stack([jittered_box(mask, torch.Generator().manual_seed(s)) for s in range(200)])
    assert (boxes[:, :2] <= [x0, y0]).all() and (boxes[:, 2:] >= [x1, y1]).all()
    assert (np.abs(boxes - [x0, y0, x1, y1]) <= most + 1e-9).all()
    assert np.abs(boxes - [x0, y0, x1, y1]).max() > 0.8 * most  # the whole range is used
    np.testing.assert_array_equal(jittered_box(mask, torch.Generator().manual_seed(3)),
                                  jittered_box(mask, torch.Generator().manual_seed(3)))
    edge = np.zeros((200, 300), bool)
    edge[0:10, 290:300] = True  # clipped to the slice
    b = jittered_box(edge, torch.Generator().manual_seed(0), jitter=20)
    assert b[1] == 0 and b[2] == 300
    np.testing.assert_array_equal(jittered_box(np.zeros((20, 30), bool), torch.Generator()), whole_box((20, 30)))


def test_training_keeps_the_base_bit_identical_and_lowers_the_loss(base, trained):
    result, before = trained
    after = base.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert not changed, changed[:5]
    model = result.model
    assert model.encoder_name == "tiny+dbsam" and model.dbsam.image_encoder is base.image_encoder
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] * 0.8, losses
    # every trained part moved away from its start; SAM's unread decoder parts stayed SAM's
    fresh = get_family("dbsam").prepare_model(base)
    start, now = fresh.trainable_modules(), model.trainable_modules()
    for name in now:
        moved = [not torch.equal(a, b) for a, b in zip(start[name].parameters(), now[name].parameters(), strict=True)]
        assert any(moved), name
    for part in ("iou_prediction_head", "output_hypernetworks_mlps.1"):
        for a, b in zip(base.mask_decoder.get_submodule(part).parameters(),
                        model.mask_decoder.get_submodule(part).parameters(), strict=True):
            assert torch.equal(a, b)


def test_the_file_loads_back_and_resuming_finds_the_run(base, cases, trained):
    result, _ = trained
    family = get_family("dbsam")
    model = family.prepare_model(base)
    meta = family.load(model, result.best_path)
    assert meta["training"]["family"] == "dbsam" and meta["structure"] == "blob"
    # a finished run resumes to nothing new (the prepared model's identity is the run's)
    again = run_training(base, cases, _options("dbsam", 2), output_dir=result.output_dir, resume=True)
    assert again.resumed_from == 2 and len(again.history) == 2
    with pytest.raises(CheckpointError, match="parts"):
        get_family("dbsam_adapters").load(get_family("dbsam_adapters").prepare_model(base), result.best_path)


@pytest.mark.parametrize("name", ["dbsam_decoder_only", "dbsam_adapters", "dbsam_no_fusion"])
def test_ablation_families_train_and_load_back(base, cases, tmp_path, name):
    result = run_training(base, cases, _options(name, 1, slice_step=2), output_dir=tmp_path,
                          features_dir=tmp_path / "f", resume=False)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])
    family = get_family(name)
    model = family.prepare_model(base)
    family.load(model, result.last_path)
    trained_state, loaded = family.trainable_state(result.model), family.trainable_state(model)
    assert trained_state.keys() == loaded.keys()
    assert all(torch.equal(trained_state[k].float(), loaded[k].float()) for k in loaded)
    assert model.mask_decoder is not base.mask_decoder


def test_the_servable_answers_as_the_family_with_its_own_identity(base, cases, trained, tmp_path):
    result, _ = trained
    family = DBSAMFamily(precision="fp32")
    servable = load_servable(base, result.best_path)
    assert not servable.training and servable.encoder_name == "tiny+dbsam"
    own = family.prepare_model(base)
    family.load(own, result.best_path)
    source = SliceImageReader().load(cases[0], "k", 4)
    mask = cases[0].mask[4]
    box = truth_box(mask) + np.array([-2, -2, 2, 2])
    predictor = SlicePredictor(servable, precision="fp32")
    predictor.set_image(source.image, source.window)
    for b in (box, whole_box(mask.shape)):
        served, _, _ = predictor.predict(box=b, multimask_output=False)
        np.testing.assert_array_equal(served[0], family.predict_box(own, source, b))
    assert family.predict_box(own, source, box).any()
    # identities: the servable's differs from the base's; equal for the same file; another file differs
    assert servable.encoder_weights_sha256 != base.encoder_weights_sha256
    assert load_servable(base, result.best_path).encoder_weights_sha256 == servable.encoder_weights_sha256
    other = family.prepare_model(base)
    family.save(other, tmp_path / "other.safetensors", structure="blob", training={})
    assert load_servable(base, tmp_path / "other.safetensors").encoder_weights_sha256 != \
        servable.encoder_weights_sha256
    with pytest.raises(CheckpointError, match="format 'sam-mask-decoder'"):
        decoder_only = get_family("dbsam_decoder_only")
        decoder_only.save(decoder_only.prepare_model(base), tmp_path / "d.safetensors", structure="blob", training={})
        load_servable(base, tmp_path / "d.safetensors")
