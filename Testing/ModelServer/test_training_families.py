"""The evidence's model families on the tiny encoder: SAM's own mask decoder fine-tuned
(``sam_decoder``) and PDMM without PRIM's mask-embedding fusion (``desam_no_fusion``) train
(the loss falls over steps on a fixed batch), plug into ``run_training`` and predict with
DeSAM's grid procedure; their files are refused as DeSAM decoders; the default PDMM is
unchanged; lazy grid mode equals the naive procedure on a trained decoder; the evidence
script runs end to end on phantom data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from desam_server.engine.grid_mode import choose_literally
from desam_server.engine.postprocess import grid_points
from desam_server.engine.preprocess import to_input_frame
from desam_server.modeling import PDMM, CheckpointError, build_desam, load_decoder, save_decoder
from desam_server.modeling.build import without_fusion
from desam_server.modeling.checkpoint import read_decoder
from desam_server.training.config import TrainConfig
from desam_server.training.evidence import compare_grid_modes
from desam_server.training.family import TrainItem, get_family
from desam_server.training.features import FeatureReader
from desam_server.training.run import TrainingOptions, precompute, prepare_data
from desam_server.training.sam_decoder_family import sam_grid_predict

from training_helpers import phantom_cases

REPO = Path(__file__).resolve().parents[2]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_desam("tiny")


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """Phantom cases, their training data and cached features (tiny encoder, seed 0)."""
    cases = phantom_cases(3)
    options = TrainingOptions(validation_fraction=0.25, empty_ratio=0.5,
                              config=TrainConfig(strategy="grid", batch_size=4, validation_grid_size=3))
    data = prepare_data(cases, options)
    directory = tmp_path_factory.mktemp("features")
    precompute(_model(), data, directory)
    return cases, options, data, directory


def _items(model, data, directory, n=4) -> list[TrainItem]:
    from desam_server.io.slices import slice_view

    reader = FeatureReader(model, directory)
    refs = [r for r in data.train if r.positive][:n]
    return [TrainItem(reader.load(data.cases[r.case], r.axis, r.index, model.device),
                      np.asarray(slice_view(data.cases[r.case].mask, r.axis, r.index)), r.positive) for r in refs]


def _fit_steps(family_name: str, model, items, steps: int = 8):
    """Adam steps on one fixed batch with fixed prompts; returns (model, losses)."""
    family = get_family(family_name)
    model = family.prepare_model(model)
    module = family.training_module(model, "grid")
    optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        generators = [torch.Generator().manual_seed(n) for n in range(len(items))]
        loss, _ = family.loss(module, items, "grid", generators)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        family.after_step(model)
        losses.append(float(loss.detach()))
    return model.eval(), losses


@pytest.fixture(scope="module")
def fitted(phantom_data):
    """family name -> (base model, its weights before, fitted model, losses): 8 steps each,
    computed once per module."""
    _, _, data, directory = phantom_data
    cache = {}

    def get(name):
        if name not in cache:
            base = _model()
            before = {part: {k: v.clone() for k, v in getattr(base, part).state_dict().items()}
                      for part in ("image_encoder", "prim", "mask_decoder")}
            cache[name] = (base, before, *_fit_steps(name, base, _items(base, data, directory)))
        return cache[name]

    return get


def _same(module, state) -> bool:
    return all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("family_name", ["sam_decoder", "desam_no_fusion"])
def test_loss_falls_over_steps_and_only_the_familys_part_trains(fitted, family_name):
    base, before, model, losses = fitted(family_name)
    assert losses[-1] < 0.7 * losses[0], losses
    assert _same(model.image_encoder, before["image_encoder"])
    if family_name == "sam_decoder":
        assert model is base
        assert not _same(model.mask_decoder, before["mask_decoder"]) and _same(model.prim, before["prim"])
    else:
        assert model is not base and model.image_encoder is base.image_encoder
        assert _same(base.prim, before["prim"])  # the base model is untouched
        assert _same(model.mask_decoder, before["mask_decoder"]) and not _same(model.prim, before["prim"])


def test_default_pdmm_is_unchanged_and_the_ablation_ignores_the_prompt():
    kwargs = dict(tap_channels=(32, 32, 32), tap_sizes=(16, 16, 16), embedding_size=16)
    torch.manual_seed(3)
    default = PDMM(**kwargs)
    torch.manual_seed(3)
    explicit = PDMM(**kwargs, fuse_mask_embedding=True)
    torch.manual_seed(3)
    ablation = PDMM(**kwargs, fuse_mask_embedding=False)
    assert default.fusion.conv1.in_channels == 512 and ablation.fusion.conv1.in_channels == 256
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values(),
                                                 strict=True))
    taps = [torch.randn(1, 32, 16, 16) for _ in range(3)]
    embeddings = torch.randn(2, 256, 16, 16)
    with torch.no_grad():
        out = default(embeddings, taps)
        assert not torch.allclose(out[0], out[1])  # DeSAM's mask depends on the mask embedding
        torch.testing.assert_close(explicit(embeddings, taps), out, rtol=0, atol=0)
        flat = ablation(embeddings, taps)
    assert flat.shape == out.shape
    torch.testing.assert_close(flat[0], flat[1], rtol=0, atol=0)


def test_no_fusion_model_masks_do_not_depend_on_the_prompt_but_its_iou_does():
    base = _model()
    variant = without_fusion(base)
    assert not variant.pdmm.fuse_mask_embedding and base.pdmm.fuse_mask_embedding
    assert variant.prompt_encoder is base.prompt_encoder and variant.prim is not base.prim
    torch.manual_seed(1)
    embedding = torch.randn(1, 256, 16, 16)
    taps = [torch.randn(1, 32, 16, 16) for _ in range(3)]
    pts = (torch.tensor([[[40.0, 50.0]], [[200.0, 120.0]]]), torch.ones(2, 1, dtype=torch.int))
    with torch.no_grad():
        iou, logits = variant.desam_forward(embedding.expand(2, -1, -1, -1), [t.expand(2, -1, -1, -1) for t in taps],
                                            points=pts)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    assert float(iou[0]) != float(iou[1])


def test_other_families_files_are_refused_as_desam_decoders(tmp_path):
    base = _model()
    sam_file, ablation_file = tmp_path / "sam.safetensors", tmp_path / "nofusion.safetensors"
    get_family("sam_decoder").save(base, sam_file, structure="blob", training={})
    variant = get_family("desam_no_fusion").prepare_model(base)
    get_family("desam_no_fusion").save(variant, ablation_file, structure="blob", training={})
    with pytest.raises(CheckpointError, match=r"'sam-mask-decoder' \(SAM's own mask decoder.*is not 'desam-decoder'"):
        load_decoder(_model(), sam_file)
    with pytest.raises(CheckpointError, match=r"'desam-decoder-no-fusion' \(the ablation.*is not 'desam-decoder'"):
        load_decoder(_model(), ablation_file)
    with pytest.raises(CheckpointError, match="is not 'desam-decoder'"):
        read_decoder(ablation_file)  # what the registry and the service read
    with pytest.raises(CheckpointError, match="no mask-embedding fusion"):
        load_decoder(variant, ablation_file)  # the ablation model loads its own format only
    with pytest.raises(ValueError, match="cannot be written as a 'desam-decoder' file"):
        save_decoder(variant, tmp_path / "x.safetensors", structure="blob")
    with pytest.raises(ValueError, match="without mask-embedding fusion"):
        get_family("desam_no_fusion").training_module(base, "grid")
    with pytest.raises(ValueError, match="'grid' strategy only"):
        get_family("sam_decoder").training_module(base, "box")
    # Each family reads its own file back.
    assert get_family("sam_decoder").load(_model(1), sam_file)["format"] == "sam-mask-decoder"
    other = get_family("desam_no_fusion").prepare_model(_model(1))
    get_family("desam_no_fusion").load(other, ablation_file)
    assert all(torch.equal(a, b) for a, b in zip(other.pdmm.state_dict().values(),
                                                 variant.pdmm.state_dict().values(), strict=True))


def _between(values, quantile: float) -> float:
    v = np.sort(np.asarray(values))
    i = min(int(quantile * len(v)), len(v) - 2)
    return float((v[i] + v[i + 1]) / 2)


@pytest.mark.parametrize("quantile,min_area", [(0.5, 16), (0.0, 0)])
def test_sam_decoder_grid_prediction_is_the_literal_procedure(phantom_data, fitted, quantile, min_area):
    _, _, data, directory = phantom_data
    model = fitted("sam_decoder")[2]
    ref = next(r for r in data.validation_refs() if r.positive)
    features = FeatureReader(model, directory).load(data.cases[ref.case], ref.axis, ref.index)
    pts = to_input_frame(grid_points(4, *features.original_size), features.original_size, model.img_size)
    ious, masks = [], []
    with torch.no_grad():
        for x, y in pts:
            low, iou = model.sam_decode(features.embedding, points=(torch.tensor([[[x, y]]], dtype=torch.float),
                                                                    torch.ones(1, 1, dtype=torch.int)),
                                        boxes=None, mask_input=None, multimask_output=False)
            ious.append(float(iou[0, 0]))
            masks.append((model.postprocess_logits(low, features.input_size, features.original_size)[0, 0] > 0).numpy())
    threshold = _between(ious, quantile)
    want = choose_literally(torch.tensor(ious), np.stack(masks), iou_threshold=threshold, min_region_area=min_area)
    for chunk in (1, 5):
        got = sam_grid_predict(model, features, grid_size=4, iou_threshold=threshold, min_region_area=min_area,
                               chunk_size=chunk)
        np.testing.assert_array_equal(got, want.mask)
    assert want.mask.any() or quantile > 0


def test_lazy_grid_mode_equals_the_naive_procedure_on_a_trained_decoder(phantom_data, fitted):
    _, _, data, directory = phantom_data
    _, _, model, losses = fitted("desam")
    assert losses[-1] < losses[0]
    reader = FeatureReader(model, directory)
    refs = data.validation_refs()
    slices = [(str(r.index), reader.load(data.cases[r.case], r.axis, r.index)) for r in refs[2:4]]
    with torch.no_grad():  # a threshold between the predicted IoUs, so that some prompts pass and some not
        f = slices[1][1]
        pts = to_input_frame(grid_points(3, *f.original_size), f.original_size, model.img_size)
        iou, _ = model.desam_forward(f.embedding.expand(len(pts), -1, -1, -1),
                                     [t.expand(len(pts), -1, -1, -1) for t in f.taps],
                                     points=(torch.tensor(pts, dtype=torch.float)[:, None],
                                             torch.ones(len(pts), 1, dtype=torch.int)))
    threshold = _between(iou.tolist(), 0.5)
    result = compare_grid_modes(model, slices, grid_size=3, iou_threshold=threshold, min_region_area=4)
    summary = result.summary()
    assert summary["slices"] == 2 and summary["slices_differing"] == 0, summary
    assert any(not s.lazy_empty for s in result.slices)
    assert all(s.lazy_decoded <= s.passed for s in result.slices)


def test_evidence_script_runs_end_to_end_on_phantoms(tmp_path):
    spec = importlib.util.spec_from_file_location("evidence_training", REPO / "scripts" / "evidence_training.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "evidence.json"
    common = ["--tiny", "--epochs", "1", "--batch-size", "4", "--work-dir", str(tmp_path / "runs"),
              "--features-dir", str(tmp_path / "features"), "--grid-sizes", "1,2", "--grid-size", "2",
              "--naive-slices", "2", "--iou-threshold=-1e9", "--min-region-area", "4"]
    assert script.main([*common, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["same_data"] and set(report["runs"]) == {"desam", "sam_decoder", "desam_no_fusion"}
    assert all(r["trained_here_seconds"] is not None and r["best_epoch"] == 1 for r in report["runs"].values())
    for name in ("desam", "sam_decoder"):
        dice = report["item2"][name]["dice"]
        assert set(dice) == {"1", "2"} and all(0 <= v <= 1 for v in dice.values())
        assert report["item2"][name]["spread_points"] == pytest.approx(100 * (max(dice.values()) - min(dice.values())))
    assert 0 <= report["item3"]["desam_no_fusion"]["dice"] <= 1
    assert report["item5"]["slices"] == 2 and report["item5"]["slices_differing"] == 0
    # A second run reuses the folders' decoders (nothing trained again) and gives the same numbers.
    again = tmp_path / "again.json"
    assert script.main([*common, "--items", "3", "--json", str(again)]) == 0
    second = json.loads(again.read_text())
    assert all(r["trained_here_seconds"] is None for r in second["runs"].values())
    assert second["item3"] == report["item3"]
