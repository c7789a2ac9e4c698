"""SAM-Mix's training data (presence labels + a few segmented slices, refused when they
contradict each other), the ``sammix`` family through ``run_training`` (both losses go
down), its file (save, load, refusals) and its serving form (merged LoRA, own encoder
identity, SlicePredictor's box prediction equal to SamMix's). Tiny encoder, ResNet-18."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from desam_server.engine import SlicePredictor
from desam_server.engine.predictor import UntrainedDecoderError
from desam_server.engine.sammix_file import build_from_file, read_sammix
from desam_server.engine.sammix_serving import load_servable
from desam_server.io.slices import slice_view
from desam_server.modeling.checkpoint import CheckpointError, load_decoder, save_decoder
from desam_server.modeling.lora import lora_modules
from desam_server.training.cases import CaseError
from desam_server.training.config import TrainConfig
from desam_server.training.family import TrainItem, get_family
from desam_server.training.run import TrainingOptions, run_training
from desam_server.training.sammix_data import (
    build_sammix_data,
    keep_slices,
    presence_from_mask,
    sammix_case,
    sammix_case_from_case,
)
from desam_server.training.sammix_family import label_box
from desam_server.training.slice_images import SliceImageReader
from desam_server.training.split import split_cases

from training_helpers import phantom, phantom_cases

OPTIONS = {"classifier_depth": 18, "classifier_lr_scale": 1.0, "box_jitter": 0.05}


def sammix_cases(n: int = 3, per_case: int = 2, seed: int = 0):
    """Phantoms; the validation volume segmented on every slice (its truth known), each
    training volume on ``per_case`` slices holding the structure."""
    plain = phantom_cases(n)
    split = split_cases(plain, axis="k", validation_fraction=0.25, seed=seed)
    validation = {p.case for p in split.validation}
    out = []
    for number, case in enumerate(plain):
        present = np.flatnonzero(presence_from_mask(case.mask, "k"))
        chosen = present if number in validation else present[np.linspace(0, present.size - 1, per_case).astype(int)]
        out.append(sammix_case_from_case(case, axis="k", segmented=chosen))
    return out


def data_for(cases, **kw):
    args = dict(axis="k", validation_fraction=0.25, slabs=2, gap=None, seed=0)
    args.update(kw)
    return build_sammix_data(cases, **args)


# ---------------------------------------------------------------- data checks


def test_presence_labels_and_segmented_slices_must_agree():
    volume, mask = phantom(0)
    presence = presence_from_mask(mask, "k")
    assert presence.tolist() == [bool(mask[k].any()) for k in range(mask.shape[0])]
    with pytest.raises(CaseError, match="no presence labels"):
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [3]), segmented=[3])
    with pytest.raises(CaseError, match="labelled absent"):
        wrong = presence.copy()
        wrong[3] = False
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [3]), segmented=[3],
                    presence=wrong)
    with pytest.raises(CaseError, match="labelled present but its segmentation is empty"):
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [4]), segmented=[3, 4],
                    presence=presence)
    with pytest.raises(CaseError, match="slice 4 holds segmentation voxels but is not listed"):
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [3, 4]), segmented=[3],
                    presence=presence)
    with pytest.raises(CaseError, match="listed twice"):
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [3]), segmented=[3, 3],
                    presence=presence)
    with pytest.raises(CaseError, match="outside the volume"):
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [3]), segmented=[3, 99],
                    presence=presence)
    with pytest.raises(CaseError, match="8 booleans"):
        sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [3]), segmented=[3],
                    presence=presence[:5])
    # present_slices: the indices holding the structure, every other slice absent
    case = sammix_case(volume, structure="blob", segmentation=keep_slices(mask, "k", [0, 3]), segmented=[0, 3],
                       present_slices=np.flatnonzero(presence))
    assert case.presence.tolist() == presence.tolist() and case.segmented == (0, 3)
    assert case.known(0) and case.known(3) and not case.known(4) and case.known(7)


def test_a_case_with_a_label_becomes_a_sammix_case_from_slice_lists():
    """``sammix_case_from_case`` (the command line's and the API's way): the label kept on
    the segmented slices; presence from the label, or from ``present_slices``."""
    from desam_server.cli_training import _ints

    plain = phantom_cases(1)[0]
    present = np.flatnonzero(presence_from_mask(plain.mask, "k"))
    derived = sammix_case_from_case(plain, axis="k", segmented=[int(present[0])])
    assert derived.presence.tolist() == presence_from_mask(plain.mask, "k").tolist()
    assert np.array_equal(derived.mask, keep_slices(plain.mask, "k", [int(present[0])]))
    listed = sammix_case_from_case(plain, axis="k", segmented=[int(present[0])],
                                   present_slices=present.tolist())
    assert listed.presence.tolist() == derived.presence.tolist() and listed.window == plain.window
    with pytest.raises(CaseError, match="segmented slice 99 is outside"):
        sammix_case_from_case(plain, axis="k", segmented=[99])
    with pytest.raises(CaseError, match="labelled absent"):
        sammix_case_from_case(plain, axis="k", segmented=[int(present[0])], present_slices=present[1:].tolist())
    assert _ints("1, 3,5-7", "--present-slices") == [1, 3, 5, 6, 7]
    for bad in ("1,x", "7-5"):
        with pytest.raises(ValueError, match="slice indices or ranges"):
            _ints(bad, "--present-slices")


def test_a_run_needs_segmented_slices_and_both_presence_classes():
    plain = phantom_cases(3)
    no_segmentation = [sammix_case_from_case(c, axis="k", segmented=[]) for c in plain]
    with pytest.raises(CaseError, match="no segmented slice: SAM-Mix needs"):
        data_for(no_segmentation)
    only_empty = [sammix_case_from_case(c, axis="k", segmented=[0]) for c in plain]
    with pytest.raises(CaseError, match="no segmented slice holds the structure"):
        data_for(only_empty)
    with pytest.raises(CaseError, match="has no presence labels"):
        data_for(plain)
    with pytest.raises(CaseError, match="labelled along axis 'k', the run slices along 'j'"):
        data_for(sammix_cases(), axis="j")
    with pytest.raises(CaseError, match="augmentations are not supported"):
        data_for(sammix_cases(), augmentations=("flip_lr",))
    # every slice labelled present in training: the classifier would learn one class
    full = [sammix_case_from_case(c, axis="k", segmented=[3]) for c in plain]
    for c in full:
        c.presence[:] = True
    with pytest.raises(CaseError, match="every training slice is labelled present"):
        data_for(full)
    # segmented slices only in the validation volume: nothing left to train the segmenter
    split = split_cases(plain, axis="k", validation_fraction=0.25, seed=0)
    val = split.validation[0].case
    only_val = [sammix_case_from_case(c, axis="k", segmented=[3] if n == val else []) for n, c in enumerate(plain)]
    with pytest.raises(CaseError, match="left for training"):
        data_for(only_val)


def test_the_data_of_a_run():
    cases = sammix_cases(per_case=2)
    data = data_for(cases, segmented_repeat=3)
    val = {p.case for p in data.validation}
    assert len(val) == 1
    for ref in data.train:
        assert ref.case not in val
        assert ref.positive == bool(cases[ref.case].presence[ref.index])
        assert ref.segmented == (ref.index in cases[ref.case].segmented)
    # every training slice labelled once; segmented slices holding the structure 3 times
    seg = [r for r in data.train if r.segmented]
    assert len(seg) == 3 * 2 * 2 and len(data.train) == 2 * 8 + 2 * 2 * 2
    summary = data.summary()
    assert summary["train_segmented"] == 4 and summary["train_segmented_with_structure"] == 4
    present = sum(int(cases[n].presence.sum()) for n in range(3) if n not in val)
    assert summary["train_labelled_present"] == present and summary["train_labelled_absent"] == 16 - present
    assert 0 < present < 16
    assert summary["validation_slices_unknown"] == 0
    # validation keeps the known slices only: leave one validation slice unsegmented
    v = next(iter(val))
    c = cases[v]
    present = [i for i in c.segmented if c.presence[i]]
    cases[v] = sammix_case_from_case(phantom_cases(3)[v], axis="k", segmented=present[1:])
    data = data_for(cases)
    assert data.summary()["validation_slices_unknown"] == 1
    assert present[0] not in data.validation[0].indices and 0 in data.validation[0].indices


def test_label_box_jitter_stays_in_the_slice():
    mask = np.zeros((40, 48), bool)
    mask[10:20, 5:30] = True
    assert label_box(mask, 0.0, torch.Generator()) == (5.0, 10.0, 30.0, 20.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x0, y0, x1, y1 = label_box(mask, 0.2, g)
        assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 40
        assert abs(x0 - 5) <= 0.2 * 25 + 1e-9 and abs(y1 - 20) <= 0.2 * 10 + 1e-9


def test_family_options_are_checked(tiny_model):
    with pytest.raises(ValueError, match="unknown sammix options: 'depth'"):
        get_family("sammix", {"depth": 18})
    with pytest.raises(ValueError, match="the desam family takes no options"):
        get_family("desam", {"classifier_depth": 18})
    with pytest.raises(ValueError, match="omega"):
        get_family("sammix", {"omega": 0.0})
    with pytest.raises(ValueError, match="JSON"):
        TrainConfig(family="sammix", family_options={"x": object()})
    assert get_family("sammix", OPTIONS).settings.classifier_depth == 18
    with pytest.raises(ValueError, match="bn_momentum"):
        get_family("sammix", {"bn_momentum": 0.0})
    # Options arrive as JSON (training jobs through the API): types and ranges checked at once.
    for bad, message in [({"rank": "eight"}, "rank must be an integer"), ({"rank": 0}, "rank must be at least 1"),
                         ({"classifier_depth": 19}, "classifier_depth must be one of"),
                         ({"classifier_depth": 18, "classifier_output_stride": 8}, "classifier_output_stride 8"),
                         ({"largest_only": 1}, "largest_only must be true or false"),
                         ({"omega": True}, "omega must be a number"), ({"focal_alpha": 2.0}, "focal_alpha"),
                         ({"lora_alpha": -1.0}, "lora_alpha")]:
        with pytest.raises(ValueError, match=message):
            get_family("sammix", bad)
    assert get_family("sammix", {"omega": 1, "lora_alpha": None}).settings.omega == 1
    sammix = get_family("sammix", {**OPTIONS, "bn_momentum": 0.3}).prepare_model(tiny_model)
    norms = [m for m in sammix.classifier.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.3 for m in norms)


# ---------------------------------------------------------------- training


def _parts(family, model, data, strategy="gt_box"):
    """Mean focal and Dice terms over every training slice (each once)."""
    reader = SliceImageReader()
    items = []
    for ref in dict.fromkeys(data.train):
        case = data.cases[ref.case]
        items.append(TrainItem(None, np.asarray(slice_view(case.mask, ref.axis, ref.index)), ref.positive,
                               image=reader.load(case, ref.axis, ref.index), segmented=ref.segmented))
    # the loss as training computes it (train mode: batch statistics over all these slices),
    # on a copy whose running statistics may move
    module = family.training_module(copy.deepcopy(model), strategy)
    with torch.no_grad():
        _, parts = family.loss(module, items, strategy, [torch.Generator().manual_seed(n) for n in range(len(items))])
    return parts


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    cases = sammix_cases(per_case=2)
    config = TrainConfig(family="sammix", strategy="gt_box", epochs=5, batch_size=4, learning_rate=2e-3,
                         precision="fp32", family_options={**OPTIONS, "segmented_repeat": 2})
    options = TrainingOptions(validation_fraction=0.25, slice_step=2, config=config)
    family = get_family("sammix", config.family_options)
    torch.manual_seed(0)
    start = family.prepare_model(tiny_model)
    before = copy.deepcopy(start)
    source = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    out = tmp_path_factory.mktemp("sammix-run")
    events = []
    result = run_training(start, cases, options, output_dir=out, events=events.append)
    return dict(cases=cases, options=options, family=family, before=before, result=result, events=events,
                source=source, out=out)


def test_a_tiny_multitask_run_lowers_both_losses(trained, tiny_model):
    family, result = trained["family"], trained["result"]
    data = family.prepare_data(trained["cases"], trained["options"])
    first, last = _parts(family, trained["before"], data), _parts(family, result.model, data)
    assert last["focal"] < 0.5 * first["focal"], (first, last)
    assert last["dice"] < first["dice"] - 0.1, (first, last)
    assert len(result.history) == 5 and all(0.0 <= h["validation_dice"] <= 1.0 for h in result.history)
    assert [e for e in trained["events"] if e["event"] == "data"][0]["train_segmented"] == 4
    # the source DeSAM was copied, never changed; the trained model is back in train mode after validation
    assert all(torch.equal(v, trained["source"][k]) for k, v in tiny_model.state_dict().items())
    assert not lora_modules(tiny_model.image_encoder)
    assert result.model.training and result.model.classifier.training
    # the classifier's running statistics moved (train-mode batch norm) and are in the file
    meta = read_sammix(result.best_path)[1]
    assert meta["training"]["family"] == "sammix" and meta["training"]["sammix_settings"]["classifier_depth"] == 18
    assert meta["inference"] == {"threshold": 0.5, "omega": 0.5, "largest_only": True}
    assert not torch.equal(result.model.classifier.bn1.running_mean, trained["before"].classifier.bn1.running_mean)


def test_cam_box_strategy_runs_and_counts_its_boxes(trained):
    family, model = trained["family"], trained["result"].model
    data = family.prepare_data(trained["cases"], trained["options"])
    parts = _parts(family, model, data, strategy="cam_box")
    assert parts["segmented"] == 4 and 0 <= parts["cam_boxes"] <= 4 and np.isfinite(parts["dice"])
    with pytest.raises(ValueError, match="box sources"):
        family.training_module(model, "grid")


# ---------------------------------------------------------------- file and serving


def test_save_load_and_refusals(trained, tiny_model, tmp_path):
    family, model = trained["family"], trained["result"].model
    path = tmp_path / "m.safetensors"
    meta = family.save(model, path, structure="blob", training={"note": 1})
    assert meta["format"] == "sam-mix" and meta["encoder"] == "tiny" and meta["lora"]["rank"] == 8
    assert meta["encoder_weights_sha256"] == tiny_model.encoder_weights_sha256 is not None
    other = family.prepare_model(tiny_model)
    family.load(other, path)
    a, b = family.trainable_state(model), family.trainable_state(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a DeSAM decoder file is not a SAM-Mix file, and the service's loader refuses ours by name
    decoder = tmp_path / "d.safetensors"
    save_decoder(tiny_model, decoder, structure="blob")
    with pytest.raises(CheckpointError, match="format 'desam-decoder' is not 'sam-mix'"):
        family.load(other, decoder)
    with pytest.raises(CheckpointError, match="SAM-Mix model"):
        load_decoder(copy.deepcopy(tiny_model), path)
    # other encoder weights, another layout, a modified adapter, a truncated file
    changed = copy.deepcopy(other)
    changed.encoder_weights_sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="trained on encoder weights"):
        family.load(changed, path)
    deeper = get_family("sammix", {**OPTIONS, "classifier_depth": 34}).prepare_model(tiny_model)
    with pytest.raises(CheckpointError, match="classifier"):
        family.load(deeper, path)
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.startswith("lora."))
    tensors[key] = tensors[key] + 1
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    tampered = tmp_path / "t.safetensors"
    save_file(tensors, str(tampered), metadata=header)
    with pytest.raises(CheckpointError, match="hash does not match"):
        family.load(other, tampered)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable SAM-Mix file"):
        family.load(other, cut)
    with pytest.raises(CheckpointError, match="not found"):
        family.load(other, tmp_path / "none.safetensors")


def test_servable_is_merged_has_its_own_identity_and_predicts_as_sammix(trained, tiny_model, tmp_path):
    family, model = trained["family"], trained["result"].model
    # adapters far from zero, so that merging and the identity matter; a head with positive
    # weights, so that every slice's map is positive somewhere and gives a box
    with torch.no_grad():
        model.classifier.fc.weight.abs_()
        g = torch.Generator().manual_seed(1)
        for m in lora_modules(model.image_encoder).values():
            m.lora_b.weight.add_(0.05 * torch.randn(m.lora_b.weight.shape, generator=g))
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    family.save(model, first, structure="blob", training={})
    base_state = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    servable = load_servable(tiny_model, first)
    assert servable.encoder_name == "tiny+sammix" and servable.image_encoder is not tiny_model.image_encoder
    assert not lora_modules(servable.image_encoder)  # merged: SAM's own layout, the base encoder's cost
    # the merged encoder (inside the embedding-only wrapper): SAM's own state-dict layout
    assert set(servable.image_encoder.encoder.state_dict()) == set(tiny_model.image_encoder.state_dict())
    assert servable.encoder_weights_sha256 not in (None, tiny_model.encoder_weights_sha256)
    assert not servable.has_trained_decoder and not servable.training
    with torch.no_grad():
        for m in lora_modules(model.image_encoder).values():
            m.lora_b.weight.mul_(0.5)
    family.save(model, second, structure="blob", training={})
    assert load_servable(tiny_model, second).encoder_weights_sha256 != servable.encoder_weights_sha256
    # the base model is unchanged
    assert all(torch.equal(v, base_state[k]) for k, v in tiny_model.state_dict().items())

    unmerged, _ = build_from_file(tiny_model, first)
    assert not unmerged.is_merged
    case = trained["cases"][0]
    predictor = SlicePredictor(servable, precision="fp32")
    with pytest.raises(UntrainedDecoderError):
        predictor.set_image(np.asarray(slice_view(case.volume.array, "k", 4)), case.window)
        predictor.predict_auto("box")
    compared = 0
    for k in range(1, 7):
        image = np.asarray(slice_view(case.volume.array, "k", k))
        box = (6, 8, 40, 34)
        predictor.set_image(image, case.window)
        masks, ious, _ = predictor.predict(box=np.array(box), multimask_output=False)
        want, want_iou = unmerged.predict_box(image, case.window, box)
        union = np.logical_or(masks[0], want).sum()
        assert union == 0 or np.logical_and(masks[0], want).sum() / union > 0.999
        assert ious[0] == pytest.approx(want_iou, abs=1e-4)
        # the whole SAM-Mix answer: locate on the servable, then SAM on its box
        # (threshold 0: every slice goes through the CAM box, whatever this short run's classifier says)
        found = servable.locate(image, case.window, threshold=0.0)
        expected = unmerged.predict_slice(image, case.window, threshold=0.0)
        assert found.probability == pytest.approx(expected.probability, abs=1e-6)
        assert (found.boxes[0] if found.boxes else None) == expected.box
        if found.boxes:
            masks, ious, _ = predictor.predict(box=np.array(found.boxes[0]), multimask_output=False)
            union = np.logical_or(masks[0], expected.mask).sum()
            assert union == 0 or np.logical_and(masks[0], expected.mask).sum() / union > 0.999
            compared += 1
    assert compared >= 3
