"""ServerLogic against a real tiny-model service on loopback: the summary Test connection
shows, the encoding progress of a volume, and the messages a user sees when the service
cannot be reached, refuses the token or answers an error."""

from __future__ import annotations

import time

import pytest

from SlicerDeSAMLib.BackgroundWorker import BackgroundWorker
from SlicerDeSAMLib.DeSAMError import DeSAMError
from SlicerDeSAMLib.ServerClient import ServerClient
from SlicerDeSAMLib.ServerLogic import ServerLogic

from service_helpers import DIRECTION, ORIGIN, SPACING, free_port, live_server, phantom_volume, tiny_settings

TOKEN = "a-test-token-of-32-characters-xx"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server-logic")
    with live_server(tiny_settings(tmp)) as (url, _):
        yield url


def test_connection_summary(service):
    summary = ServerLogic(ServerClient(service)).test_connection()
    assert summary.url == service and summary.version
    assert summary.model == "tiny (weights test)"
    assert summary.device == "cpu, fp32"
    assert summary.decoders == "phantom (file)"
    assert summary.decoder_names == ("phantom",) and summary.structures == ("phantom",)
    assert summary.cache.startswith("host 0 slices, 0 B of 64.0 MiB; disk 0 slices"), summary.cache
    assert summary.training == "none running" and summary.auth is False
    assert summary.info["model"]["encoder"] == "tiny" and summary.decoders_raw[0]["name"] == "phantom"
    assert summary.registry == ()
    lines = summary.lines()
    assert lines[0] == f"Service {summary.version} at {service}"
    assert "Decoders: phantom (file)" in lines


def test_encoding_progress_counts_cached_slices(service):
    client = ServerClient(service)
    volume = phantom_volume(k=4, seed=3)
    volume_id, _ = client.upload_volume(volume, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    logic = ServerLogic(client)
    assert logic.encoding_progress(volume_id, "k") == (0, 4)
    assert logic.encoding_progress(volume_id, "j", (40, 400)) == (0, volume.shape[1])
    client.precompute(volume_id, "k")
    deadline = time.monotonic() + 120
    while logic.encoding_progress(volume_id, "k")[0] < 4:
        assert time.monotonic() < deadline, "precompute did not finish"
        time.sleep(0.1)
    assert logic.encoding_progress(volume_id, "k") == (4, 4)
    assert logic.encoding_progress(volume_id, "k", (0, 2000)) == (0, 4)   # another window, another cache key
    with pytest.raises(DeSAMError) as error:
        logic.encoding_progress("0" * 64, "k")
    assert str(error.value).startswith("Could not read the encoding progress: unknown volume 000000000000")
    assert str(error.value).endswith("(404)") and error.value.status == 404


def test_through_the_background_worker(service):
    worker = BackgroundWorker()
    got = []
    try:
        worker.submit(ServerLogic(ServerClient(service)).test_connection, on_done=got.append, on_error=got.append)
        deadline = time.monotonic() + 30
        while not got and time.monotonic() < deadline:
            worker.poll()
            time.sleep(0.01)
    finally:
        worker.shutdown()
    assert got and got[0].model == "tiny (weights test)"


def test_unreachable_service_message():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DeSAMError) as error:
        ServerLogic(ServerClient(url, timeout=5)).test_connection()
    message = str(error.value)
    assert message.startswith(f"Cannot reach the DeSAM service at {url}: ")
    assert "Connection refused" in message and "Check that it is running" in message
    assert error.value.status == 0
    with pytest.raises(DeSAMError, match=f"^Cannot reach the DeSAM service at {url}: "):
        ServerLogic(ServerClient(url, timeout=5)).encoding_progress("0" * 64)


def test_token_refused_message(tmp_path):
    with live_server(tiny_settings(tmp_path, decoder=False, token=TOKEN)) as (url, _):
        for token in (None, "a-wrong-token-of-32-characters-x"):
            with pytest.raises(DeSAMError) as error:
                ServerLogic(ServerClient(url, token=token)).test_connection()
            assert str(error.value) == (f"The DeSAM service at {url} refused the token (401): missing or wrong API "
                                        "token: send 'Authorization: Bearer <token>'. Enter the service's token in "
                                        "the Server panel.")
            assert error.value.status == 401
        summary = ServerLogic(ServerClient(url, token=TOKEN)).test_connection()
        assert summary.auth is True and summary.decoders == "none (train one in the Train panel)"
        assert "Decoders: none (train one in the Train panel)" in summary.lines()


def test_busy_and_other_answers_keep_the_service_message():
    from SlicerDeSAMLib.ServerClient import ServerError

    url = "http://127.0.0.1:8765"
    busy = DeSAMError.from_server_error(ServerError(503, "the service is starting", retry_after=2.0), url, "x")
    assert str(busy) == f"The DeSAM service at {url} is busy (503): the service is starting. Try again in 2 s."
    queue = DeSAMError.from_server_error(ServerError(429, "too many jobs"), url, "x")
    assert str(queue) == f"The DeSAM service at {url} is busy (429): too many jobs. Try again in a moment."
    other = DeSAMError.from_server_error(ServerError(409, "training job 1234 is running"), url,
                                         "Could not start training")
    assert str(other) == "Could not start training: training job 1234 is running (409)" and other.status == 409
    lost = DeSAMError.from_server_error(ServerError(0, "no answer within 5 s"), url, "x")
    assert str(lost).startswith(f"Cannot reach the DeSAM service at {url}: no answer within 5 s. ")


def test_a_service_that_does_not_answer_is_reported_after_the_short_timeout():
    import socket

    with socket.socket() as silent:              # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        logic = ServerLogic(ServerClient(url, timeout=60), timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(DeSAMError) as error:
            logic.test_connection()
        assert time.monotonic() - t0 < 5
    assert str(error.value).startswith(f"Cannot reach the DeSAM service at {url}: no answer within 1 s.")
