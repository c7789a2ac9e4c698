"""The service with pretrained MobileSAM on the real head CT, through the client."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import dice
from desam_server.api import build_service
from desam_server.engine.postprocess import largest_component
from desam_server.io import read_volume
from SlicerDeSAMLib.ServerClient import ServerClient
from service_helpers import live_server, tiny_settings

pytestmark = pytest.mark.realweights


def test_mobile_sam_round_trip_on_real_ct(tmp_path):
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    volume = read_volume(sample.volume)
    head = read_volume(sample.head_mask).array > 0
    index = sample.reference_slice
    g = volume.geometry
    settings = tiny_settings(tmp_path, decoder=False, encoder="mobile_sam")
    with live_server(settings, factory=build_service) as (url, _):
        client = ServerClient(url, timeout=120)
        info = client.info()["model"]
        assert info["encoder"] == "mobile_sam" and info["embedded_default"] is True
        assert info["encoder_weights_sha256"]
        vid, sent = client.upload_volume(volume.array, spacing=g.spacing, origin=g.origin, direction=g.direction)
        assert sent and client.volume(vid)["shape"] == list(volume.array.shape)
        window = sample.window
        client.set_view(vid, "k", index, window=window)
        ys, xs = np.nonzero(largest_component(head[index]))
        box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        answer = client.segment_prompt(vid, "k", index, box=box, multimask=False, window=window)
        assert answer.masks.shape == (1, *head.shape[1:])
        assert dice(answer.mask, head[index]) >= 0.95
        centre = [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]
        click = client.segment_prompt(vid, "k", index, points=[centre], labels=[1], window=window)
        assert click.timing["cached"] is True
        assert dice(click.mask, head[index]) >= 0.9
