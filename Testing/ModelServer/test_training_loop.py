"""The whole loop through the service with its defaults: cases uploaded (volumes and their
label volumes) -> a decoder trained in the background -> installed in the decoder registry
and served without a restart -> automatic segmentation with it; a second run becomes
version 2, and rolling back serves version 1 again."""

from __future__ import annotations

import numpy as np

from SlicerDeSAMLib.ServerClient import ServerClient

from service_helpers import DIRECTION, ORIGIN, SPACING, live_server, phantom_volume, tiny_settings

OPTIONS = {"validation_fraction": 0.5, "empty_ratio": 0.0,
           "config": {"strategy": "box", "epochs": 2, "batch_size": 3, "seed": 0}}


def _auto_mask(client: ServerClient, volume_id: str) -> np.ndarray:
    job = client.segment_auto(volume_id, decoder="organ", mode="box")
    client.wait_job(job["id"], timeout=120)
    return client.job_result(job["id"]).mask


def test_cases_in_decoder_trained_installed_and_served(tmp_path, tiny_sam_checkpoint):
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0], training_threads=1)
    with live_server(settings) as (url, app):
        client = ServerClient(url, timeout=60)
        assert "organ" not in [d["name"] for d in client.decoders()]
        ids = []
        for seed in (0, 1):
            volume = phantom_volume(k=3, seed=seed)
            vid, _ = client.upload_volume(volume, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
            client.put_label(vid, "organ", volume > 30)
            ids.append(vid)
        cases = [(vid, "organ") for vid in ids]

        first = client.wait_training(client.start_training("organ", cases, OPTIONS)["id"], timeout=300)
        assert first["state"] == "finished", first
        assert first["installed"] == "organ v1"
        served = {d["name"]: d for d in client.decoders()}
        assert served["organ"]["version"] == "v1" and served["organ"]["source"] == "registry"
        record = client.decoder_record("organ", "v1")
        training = record["metadata"]["training"]
        # The installed file is the best epoch's: its record lists the epochs up to that one.
        assert training["strategy"] == "box" and training["best_epoch"] in (1, 2)
        assert len(training["epochs"]) == training["best_epoch"] and training["data"]["volumes"] == 2
        v1 = _auto_mask(client, ids[0])

        options = {**OPTIONS, "config": {**OPTIONS["config"], "seed": 1, "epochs": 3}}
        second = client.wait_training(client.start_training("organ", cases, options)["id"], timeout=300)
        assert second["installed"] == "organ v2"
        assert {d["name"]: d for d in client.decoders()}["organ"]["version"] == "v2"
        v2 = _auto_mask(client, ids[0])
        assert not np.array_equal(v1, v2)  # another decoder, served without a restart
        client.rollback_decoder("organ")
        assert {d["name"]: d for d in client.decoders()}["organ"]["version"] == "v1"
        assert np.array_equal(_auto_mask(client, ids[0]), v1)
