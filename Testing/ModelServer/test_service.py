"""Service behaviour beyond single endpoints: restart, overload, shutdown, settings, serve."""

from __future__ import annotations

import signal
import threading

import pytest
from fastapi.testclient import TestClient

from desam_server.api import ServiceSettings, SettingsError, create_app
from SlicerDeSAMLib.ServerClient import ServerClient

from scheduler_helpers import wait_until
from service_helpers import (
    free_port,
    id_of,
    payload_of,
    phantom_volume,
    serve_process,
    stop_process,
    tiny_factory,
    tiny_settings,
)


def click(c, vid, index=2, **extra):
    return c.post("/segment/prompt", json={"volume_id": vid, "axis": "k", "index": index, "box": [5, 5, 40, 30],
                                           **extra})


def test_restart_reuses_volumes_and_the_disk_tier(tmp_path, tiny_sam_checkpoint):
    settings = tiny_settings(tmp_path, checkpoint=tiny_sam_checkpoint[0])
    vol = phantom_volume()
    with TestClient(create_app(settings, tiny_factory)) as c:
        vid = c.post("/volumes", content=payload_of(vol)).json()["volume_id"]
        first = click(c, vid).json()
        assert first["timing"]["cached"] is False
    with TestClient(create_app(settings, tiny_factory)) as c:
        assert c.get(f"/volumes/{vid}").status_code == 200            # no second upload needed
        again = click(c, vid).json()
        assert again["timing"]["cached"] is True                      # features from the disk tier
        assert [m["mask"] for m in again["masks"]] == [m["mask"] for m in first["masks"]]
        assert c.get("/info").json()["cache"]["tiers"]["disk"]["entries"] >= 1


def test_corrupt_volume_file_is_dropped_not_served(tmp_path):
    settings = tiny_settings(tmp_path)
    vol = phantom_volume()
    with TestClient(create_app(settings, tiny_factory)) as c:
        vid = c.post("/volumes", content=payload_of(vol)).json()["volume_id"]
    path = settings.volume_dir / f"{vid}.vol"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    (settings.volume_dir / f".{vid}.vol.abc.tmp").write_bytes(b"half-written")
    with TestClient(create_app(settings, tiny_factory)) as c:
        assert not (settings.volume_dir / f".{vid}.vol.abc.tmp").exists()
        r = c.get(f"/volumes/{vid}")
        assert r.status_code == 404 and "upload it again" in r.json()["detail"]
        assert not path.exists() and c.get("/info").json()["volumes"]["corrupt_files"] == 1
        assert c.post("/volumes", content=payload_of(vol)).status_code == 201


def test_volume_budgets_evict_least_recently_used(tmp_path):
    payloads = [payload_of(phantom_volume(seed=s)) for s in range(3)]
    sizes = [len(p) for p in payloads]
    settings = tiny_settings(tmp_path, volume_memory_bytes=2 * phantom_volume().nbytes,
                             volume_disk_bytes=max(sizes[0] + sizes[1], sizes[1] + sizes[2]))
    with TestClient(create_app(settings, tiny_factory)) as c:
        vids = [c.post("/volumes", content=p).json()["volume_id"] for p in payloads]
        stats = c.get("/info").json()["volumes"]
        assert stats["memory"]["bytes"] <= stats["memory"]["budget_bytes"] and stats["memory"]["entries"] == 2
        assert stats["disk"]["bytes"] <= stats["disk"]["budget_bytes"] and stats["disk"]["entries"] == 2
        assert c.get(f"/volumes/{vids[0]}").status_code == 404       # oldest gone from both tiers
        assert click(c, vids[1]).status_code == 200 and click(c, vids[2]).status_code == 200


def test_overload_gives_429_and_timeout_503_with_retry_after(tmp_path):
    settings = tiny_settings(tmp_path, max_pending_prompts=1, click_timeout_s=1.0)
    with TestClient(create_app(settings, tiny_factory)) as c:
        vid = c.post("/volumes", content=payload_of(phantom_volume())).json()["volume_id"]
        service = c.app.state.service
        service.scheduler.pause()
        results = {}
        waiting = threading.Thread(target=lambda: results.setdefault("first", click(c, vid, index=1)))
        waiting.start()
        wait_until(lambda: service.info()["prompts_waiting"] == 1, timeout=10)
        busy = click(c, vid, index=3)
        assert busy.status_code == 429 and int(busy.headers["retry-after"]) >= 1
        waiting.join(20)
        assert not waiting.is_alive()
        assert results["first"].status_code == 503 and "retry-after" in results["first"].headers
        service.scheduler.resume()
        assert click(c, vid, index=1).status_code == 200


def test_shutdown_cancels_running_jobs(tmp_path):
    app = create_app(tiny_settings(tmp_path), tiny_factory)
    with TestClient(app) as c:
        vid = c.post("/volumes", content=payload_of(phantom_volume(k=40))).json()["volume_id"]
        service = app.state.service
        job = c.post("/segment/auto", json={"volume_id": vid, "mode": "grid"}).json()
        wait_until(lambda: service.jobs.get(job["id"]).done >= 1, timeout=120)
    final = service.jobs.get(job["id"])
    assert final.state == "cancelled" and final.done < 40 and final.error == "the service shut down"
    assert service.closed and service.scheduler.stats()["closed"]


def test_settings_precedence_and_errors(tmp_path):
    config = tmp_path / "desam.toml"
    config.write_text('port = 9000\nmax_points = 5\nvolume_dir = "off"\n[cache]\nhost_bytes = "1GiB"\n')
    s = ServiceSettings.load(config, environ={"DESAM_PORT": "9100", "DESAM_CACHE_HOST_BYTES": "2GiB"},
                             max_points=7)
    assert (s.port, s.max_points, s.volume_dir, s.cache.host_bytes) == (9100, 7, None, 2 << 30)
    token_file = tmp_path / "token"
    token_file.write_text("x" * 20 + "\n")
    assert ServiceSettings.load(environ={"DESAM_TOKEN_FILE": str(token_file)}).token == "x" * 20
    for env in ({"DESAM_PORT": "http"}, {"DESAM_VOLUME_DISK_BYTES": "lots"}, {"DESAM_TOKEN": "short"},
                {"DESAM_CACHE_DTYPE": "int8"}, {"DESAM_PRECISION": "fp8"}):
        with pytest.raises(SettingsError):
            ServiceSettings.load(environ=env)
    config.write_text("prot = 1\n")
    with pytest.raises(SettingsError, match="unknown setting"):
        ServiceSettings.load(config, environ={})
    with pytest.raises(SettingsError, match="refusing to listen"):
        ServiceSettings(host="0.0.0.0").check_bind()
    ServiceSettings(host="0.0.0.0", token="t" * 16, allow_insecure_http=True).check_bind()
    ServiceSettings(host="::1").check_bind()
    assert "token" not in ServiceSettings(token="t" * 16).public()


def test_serve_command_on_loopback_and_graceful_stop(tmp_path):
    port = free_port()
    proc = serve_process(tmp_path, "--port", str(port))
    try:
        client = ServerClient(f"http://127.0.0.1:{port}", timeout=30)
        client.wait_until_ready(timeout=120)
        vol = phantom_volume()
        vid, sent = client.upload_volume(vol, spacing=(0.8, 0.8, 2.5), origin=(-100, -120, 30),
                                         direction=[[1, 0, 0], [0, 1, 0], [0, 0, 1]])
        assert sent and vid == id_of(vol)
        assert client.segment_prompt(vid, "k", 1, box=[5, 5, 40, 30]).masks.shape == (3, 48, 64)
        client.close()
    finally:
        status, out = stop_process(proc)
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status tells how it ended.
    assert status in (0, -signal.SIGTERM), out
    assert "service stopped" in out and "Application shutdown complete" in out and "Traceback" not in out
    assert vid not in out                       # logs name volumes by a 12-character prefix only


def test_serve_refuses_public_bind_without_token(tmp_path):
    proc = serve_process(tmp_path, "--host", "0.0.0.0", "--port", str(free_port()))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "refusing to listen on 0.0.0.0" in out



def test_cors_is_off_unless_origins_are_listed(tmp_path):
    headers = {"Origin": "http://viewer.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app(tiny_settings(tmp_path, decoder=False), tiny_factory)) as c:
        assert "access-control-allow-origin" not in c.get("/health", headers=headers).headers
        assert c.options("/health", headers=headers).status_code == 405
    settings = tiny_settings(tmp_path, decoder=False, cors_origins=("http://viewer.example",))
    with TestClient(create_app(settings, tiny_factory)) as c:
        assert c.get("/health", headers=headers).headers["access-control-allow-origin"] == "http://viewer.example"
        other = c.get("/health", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


@pytest.mark.parametrize("precision,bf16", [("fp32", False), ("bf16", True)])
def test_info_reports_the_encoder_precision_in_use(tmp_path, precision, bf16):
    service = tiny_factory(tiny_settings(tmp_path, decoder=False, precision=precision))
    try:
        model = service.info()["model"]
        assert model["bf16"] is bf16 and model["precision"] == ("bfloat16" if bf16 else "fp32")
    finally:
        service.close()
