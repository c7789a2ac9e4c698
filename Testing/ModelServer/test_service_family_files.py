"""DB-SAM and SAM-Mix model files as versions in the decoder registry, served by the
service and used through ``ServerClient``: listed with their family, a DB-SAM box prompt
equal to the engine's answer on the servable, its features cached apart from the base
encoder's, a second version activated (its encoder replaces the first's), a SAM-Mix
cam-box job with the file's own inference options, files of another base refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from desam_server.decoder_registry import DecoderRegistry
from desam_server.engine import IntensityWindow, SlicePredictor
from desam_server.engine.dbsam_serving import load_servable as load_dbsam
from desam_server.engine.sammix import build_sammix
from desam_server.engine.sammix_file import save_sammix
from desam_server.modeling import build_desam
from desam_server.modeling.checkpoint import CheckpointError, read_model_metadata
from desam_server.modeling.dbsam_file import save_dbsam_model
from desam_server.modeling.dbsam_model import build_dbsam_model
from SlicerDeSAMLib.ServerClient import ServerClient

from service_helpers import live_server, phantom_volume, tiny_settings

VOLUME = phantom_volume(k=6, h=64, w=80)
WINDOW = (100.0, 600.0)
BOX = [20.0, 12.0, 60.0, 44.0]


def dbsam_file(base, path, *, seed: int, structure: str = "organ_db"):
    model = build_dbsam_model(base, checkpoint_stages=False, init_seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    model.weights_changed()
    save_dbsam_model(model, path, structure=structure, training={"note": "test"})
    return path


def sammix_file(base, path, *, structure: str = "organ_mix"):
    torch.manual_seed(4)
    sammix = build_sammix(base, classifier_depth=18).eval()
    save_sammix(sammix, path, structure=structure, inference={"threshold": 0.0, "omega": 0.5, "largest_only": True})
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_sam_checkpoint):
    tmp = tmp_path_factory.mktemp("family-files")
    checkpoint = tiny_sam_checkpoint[0]
    base = build_desam("tiny", sam_checkpoint=checkpoint)
    registry = DecoderRegistry(tmp / "registry")
    files = {"db1": dbsam_file(base, tmp / "db1.safetensors", seed=1),
             "db2": dbsam_file(base, tmp / "db2.safetensors", seed=2),
             "mix": sammix_file(base, tmp / "mix.safetensors")}
    registry.register(files["db1"])
    registry.register(files["db2"], activate=False)
    registry.register(files["mix"])
    with live_server(tiny_settings(tmp, checkpoint=checkpoint)) as (url, app):
        service = app.state.service
        client = ServerClient(url)
        volume_id, _ = client.upload_volume(VOLUME, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0),
                                            direction=np.eye(3))
        yield client, service, volume_id, base, files


def test_versions_are_listed_and_served_with_their_family(served):
    client, service, _, _, files = served
    decoders = {d["name"]: d for d in client.decoders()}
    assert decoders["organ_db"]["family"] == "dbsam" and decoders["organ_db"]["version"] == "v1"
    assert decoders["organ_mix"]["family"] == "sammix" and decoders["phantom"]["family"] == "desam"
    versions = client.registry_structure("organ_db")["versions"]
    assert [v["family"] for v in versions] == ["dbsam", "dbsam"]
    assert read_model_metadata(files["db1"])[0] == "dbsam" and read_model_metadata(files["mix"])[0] == "sammix"
    assert len(service.scheduler.encoders()) == 2


def test_a_dbsam_box_prompt_through_the_client(served):
    client, service, volume_id, base, files = served
    answer = client.segment_prompt(volume_id, "k", 2, box=BOX, decoder="organ_db", multimask=False, window=WINDOW)
    model = load_dbsam(base, files["db1"])
    predictor = SlicePredictor(model, precision="fp32")
    predictor.set_image(VOLUME[2], IntensityWindow(*WINDOW))
    masks, ious, _ = predictor.predict(box=np.array(BOX), multimask_output=False)
    assert (answer.masks[0] == masks[0]).mean() > 0.99 and abs(float(answer.ious[0]) - float(ious[0])) < 2e-2
    sid = next(iter(service._sessions[volume_id]))
    loaded = service.decoders.get("organ_db")
    assert service.scheduler.is_cached(sid, "k", 2, encoder=loaded.encoder)
    assert not service.scheduler.is_cached(sid, "k", 2)     # only the DB-SAM encoder ran for this slice
    client.segment_prompt(volume_id, "k", 2, box=BOX, multimask=False, window=WINDOW)   # SAM on the base
    assert service.scheduler.is_cached(sid, "k", 2)


def test_activating_another_version_swaps_its_encoder(served):
    client, service, volume_id, _, _ = served
    before = service.decoders.get("organ_db").encoder
    first = client.segment_prompt(volume_id, "k", 3, box=BOX, decoder="organ_db", multimask=False, window=WINDOW)
    client.activate_decoder("organ_db", "v2")
    after = service.decoders.get("organ_db").encoder
    assert after != before and before not in service.scheduler.encoders() and after in service.scheduler.encoders()
    second = client.segment_prompt(volume_id, "k", 3, box=BOX, decoder="organ_db", multimask=False, window=WINDOW)
    assert (first.masks[0] != second.masks[0]).any() or abs(float(first.ious[0]) - float(second.ious[0])) > 1e-4
    client.rollback_decoder("organ_db")
    assert service.decoders.get("organ_db").encoder == before


def test_a_sammix_cam_box_job_through_the_client(served):
    client, _, volume_id, _, _ = served
    job = client.segment_auto(volume_id, mode="cam-box", decoder="organ_mix", start=1, stop=3, window=WINDOW)
    done = client.wait_job(job["id"], timeout=120)
    assert done["state"] == "succeeded", done["error"]
    assert done["spec"]["presence_threshold"] == 0.0          # the file's own inference options
    assert [s["index"] for s in done["slices"]] == [1, 2]
    assert all(s["presence"] is not None for s in done["slices"])
    result = client.job_result(job["id"])
    assert result.offset == 1 and result.mask.shape[0] == 2


def test_a_file_made_on_another_base_is_refused(tmp_path, served):
    from desam_server.api.decoders import DecoderSet

    _, service, _, _, _ = served
    torch.manual_seed(9)
    other = build_desam("tiny")                  # random weights: another encoder identity
    path = dbsam_file(other, tmp_path / "other.safetensors", seed=3)
    with pytest.raises(CheckpointError):
        DecoderSet(service.model).build(path, "other")
