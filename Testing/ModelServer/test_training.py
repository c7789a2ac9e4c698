"""The training loop on tiny configurations: the loss falls and validation Dice passes a
threshold; cancel stops within a step; resume repeats an uninterrupted run; a process
killed at random moments leaves readable files; the command line (precompute, train,
evaluate) end to end; torchrun with 2 gloo processes matches one process."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from desam_server.modeling import build_desam
from desam_server.modeling.checkpoint import read_decoder
from desam_server.training.config import TrainConfig
from desam_server.training.run import TrainingOptions, run_training
from desam_server.training.train_state import load_state
from desam_server.training.trainer import TrainingCancelled

from training_helpers import phantom_cases, tiny_checkpoint, write_phantom_files

REPO = Path(__file__).resolve().parents[2]


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_desam("tiny")


def _options(**config) -> TrainingOptions:
    # fp32: the resume test compares weights at float tolerance (bf16 autocast on CPUs with
    # native bf16 rounds differently with thread scheduling).
    base = dict(strategy="box", epochs=3, batch_size=4, learning_rate=1e-3, validation_grid_size=3, precision="fp32")
    base.update(config)
    return TrainingOptions(validation_fraction=0.25, empty_ratio=0.5, config=TrainConfig(**base))


def _trainable(model) -> dict:
    return {k: v.detach().clone() for k, v in (*model.prim.state_dict().items(),
                                                *(("pdmm." + k, v) for k, v in model.pdmm.state_dict().items()))}


def test_loss_falls_and_validation_dice_passes_a_threshold(tmp_path):
    events = []
    result = run_training(_model(), phantom_cases(4), _options(), output_dir=tmp_path / "run",
                          features_dir=tmp_path / "features", events=events.append)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.best_dice > 0.85, result.history
    kinds = [e["event"] for e in events]
    assert kinds[0] == "data" and "precomputed" in kinds and kinds.count("epoch") == 3
    assert all(e["seconds_left"] is not None for e in events if e["event"] == "step")
    _, meta = read_decoder(result.best_path)
    record = meta["training"]
    assert meta["structure"] == "blob" and record["strategy"] == "box" and record["best_epoch"] == result.best_epoch
    assert len(record["epochs"]) == 3 and record["data"]["train_slices_empty"] > 0
    assert "case" not in json.dumps(record["data"]).replace("cases", "")  # counts only, no ids or paths
    assert (tmp_path / "run" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_strategy_trains_the_iou_head(tmp_path):
    model = _model()
    head_before = [p.detach().clone() for p in model.prim.iou_prediction_head.parameters()]
    run_training(model, phantom_cases(3), _options(strategy="grid", epochs=1), output_dir=tmp_path / "run",
                 features_dir=tmp_path / "features")
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.prim.iou_prediction_head.parameters(),
                                                      strict=True))
    box = _model()
    head_before = [p.detach().clone() for p in box.prim.iou_prediction_head.parameters()]
    run_training(box, phantom_cases(3), _options(epochs=1), output_dir=tmp_path / "box",
                 features_dir=tmp_path / "features")
    assert all(torch.equal(a, b) for a, b in zip(head_before, box.prim.iou_prediction_head.parameters(), strict=True))


def test_cancel_stops_within_a_step_and_resume_repeats_the_uninterrupted_run(tmp_path):
    cases = phantom_cases(4)
    features = tmp_path / "features"
    whole = _model()
    run_training(whole, cases, _options(epochs=2), output_dir=tmp_path / "whole", features_dir=features)

    steps = []

    def stop_in_epoch_two():
        return sum(1 for e in steps if e["event"] == "step" and e["epoch"] == 2) >= 2

    interrupted = _model()
    t0 = time.perf_counter()
    with pytest.raises(TrainingCancelled) as info:
        run_training(interrupted, cases, _options(epochs=2), output_dir=tmp_path / "run", features_dir=features,
                     events=steps.append, should_stop=stop_in_epoch_two)
    assert info.value.epoch == 1
    assert sum(1 for e in steps if e["event"] == "step" and e["epoch"] == 2) == 2  # stopped before a third step
    assert time.perf_counter() - t0 < 300
    assert load_state(tmp_path / "run" / "state.pt")["epoch"] == 1

    resumed = _model()  # the same frozen parts (a checkpoint's, in real use) ...
    with torch.no_grad():  # ... and other trainable weights: resume must load the saved ones
        for p in (*resumed.prim.parameters(), *resumed.pdmm.parameters()):
            p.add_(torch.randn_like(p))
    result = run_training(resumed, cases, _options(epochs=2), output_dir=tmp_path / "run", features_dir=features)
    assert result.resumed_from == 1 and len(result.history) == 2
    a, b = _trainable(whole), _trainable(resumed)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        run_training(_model(), cases, _options(epochs=3), output_dir=tmp_path / "run", features_dir=features)


def _cli(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO / "ModelServer"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "desam_server.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def _case_args(pairs):
    out = []
    for v, m in pairs:
        out += ["--case", str(v), str(m)]
    return out


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    pairs = write_phantom_files(root, 4)
    ckpt = tiny_checkpoint(root / "tiny.pth")
    common = ["--encoder", "tiny", "--sam-checkpoint", str(ckpt), "--device", "cpu", "--precision", "fp32",
              "--structure", "blob", "--window", "150,500", "--features-dir", str(root / "features"),
              *_case_args(pairs)]
    train = ["--strategy", "box", "--batch-size", "4", "--learning-rate", "1e-3", "--empty-ratio", "0.5",
             "--validation-fraction", "0.25"]
    proc = _cli("precompute", *common, *train, "-q")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return root, common, train, json.loads(out)


def test_cli_precompute_train_evaluate(cli_data, tmp_path):
    root, common, train, precomputed = cli_data
    assert precomputed["precompute"]["slices"] > 0 and precomputed["data"]["split"]["kind"] == "volume"
    proc = _cli("train", *common, *train, "--epochs", "2", "--output", str(tmp_path / "run"), "-q")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["best_epoch"] in (1, 2)
    proc = _cli("evaluate", *[a for a in common], "--decoder", result["best"], "--mode", "box",
                "--tolerance-mm", "2", "--output", str(tmp_path / "eval"), "-q")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["volumes"] == 4 and 0.0 <= summary["mean_nsd"] <= 1.0 and summary["mean_dice"] > 0.5
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert len(report["per_volume"]) == 4 and report["worst_slices"]
    assert (tmp_path / "eval" / "evaluation.csv").read_text().startswith("case_id,dice,nsd")
    assert (tmp_path / "eval" / "worst_slices.png").exists()
    bad = _cli("train", *common[:-6], "--case", str(root / "case0.nrrd"), str(root / "case1_label.nrrd"),
               *train, "--output", str(tmp_path / "bad"))
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and "error:" in err


def test_cli_trains_and_installs_dbsam_and_sammix_models(cli_data, tmp_path):
    """``train --family dbsam`` and ``--family sammix`` (a few segmented slices per case,
    presence from the label): their files become registry versions of their family; a
    family's wrong options are refused before anything runs."""
    from desam_server.decoder_registry import DecoderRegistry

    _, common, _, _ = cli_data
    data = ["--batch-size", "2", "--learning-rate", "1e-3", "--empty-ratio", "0.5", "--validation-fraction", "0.25",
            "--epochs", "1", "--train-precision", "fp32", "--install", "--registry-dir", str(tmp_path / "registry")]
    proc = _cli("train", *common, *data, "--family", "dbsam", "--structure", "blob_db",
                "--output", str(tmp_path / "db"), "-q")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert json.loads(out)["installed"] == "blob_db v1"
    segmented = ["--segmented-slices", "2,4"] * 4
    proc = _cli("train", *common, *data, "--family", "sammix", "--structure", "blob_mix", *segmented,
                "--family-option", "classifier_depth=18", "--output", str(tmp_path / "mix"), "-q")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert json.loads(out)["installed"] == "blob_mix v1"
    registry = DecoderRegistry(tmp_path / "registry")
    assert registry.active("blob_db").family == "dbsam" and registry.active("blob_mix").family == "sammix"
    bad = _cli("train", *common, *data, "--family", "sammix", "--structure", "x", "--output", str(tmp_path / "x"))
    _, err = bad.communicate(timeout=300)
    assert bad.returncode != 0 and "needs one --segmented-slices per --case" in err


def test_killed_at_random_moments_never_leaves_a_corrupt_file(cli_data, tmp_path):
    root, common, train, _ = cli_data
    out_dir = tmp_path / "run"
    rng = random.Random(5)
    for _ in range(3):
        proc = _cli("train", *common, *train, "--epochs", "6", "--output", str(out_dir), "-q")
        time.sleep(rng.uniform(4, 14))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if (out_dir / "state.pt").exists():
            assert load_state(out_dir / "state.pt")["epoch"] >= 1
        for name in ("best.safetensors", "last.safetensors"):
            if (out_dir / name).exists():
                read_decoder(out_dir / name)
        if (out_dir / "history.json").exists():
            json.loads((out_dir / "history.json").read_text())
    proc = _cli("train", *common, *train, "--epochs", "6", "--output", str(out_dir), "-q")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert len(json.loads((out_dir / "history.json").read_text())["history"]) == 6


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed beside this Python")
def test_torchrun_two_gloo_processes_match_one_process(cli_data, tmp_path):
    root, common, train, _ = cli_data
    args = ["train", *common, *train, "--epochs", "2", "--train-precision", "fp32", "-q"]
    single = _cli(*args, "--output", str(tmp_path / "one"))
    out, err = single.communicate(timeout=900)
    assert single.returncode == 0, err
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": str(REPO / "ModelServer"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "desam_server.cli", *args,
                           "--output", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "history.json").read_text())["history"]
    two = json.loads((tmp_path / "two" / "history.json").read_text())["history"]
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["validation_dice"] == pytest.approx(a["validation_dice"], abs=1e-3)
    wa, _ = read_decoder(tmp_path / "one" / "last.safetensors")
    wb, meta = read_decoder(tmp_path / "two" / "last.safetensors")
    assert meta["training"]["world_size"] == 2
    # Adam divides by the gradients' running RMS, so float rounding in the all-reduce moves
    # single weights with near-zero gradients by up to a few steps (lr 1e-3): the weights are
    # compared as relative distances, over all of them and per tensor.
    distances = {key: float((wb[key] - wa[key]).norm() / wa[key].norm().clamp_min(1e-12)) for key in wa}
    total = float(sum((wb[k] - wa[k]).square().sum() for k in wa).sqrt() / sum(wa[k].square().sum() for k in wa).sqrt())
    assert total < 1e-3, total
    assert max(distances.values()) < 1e-2, max(distances.items(), key=lambda kv: kv[1])
