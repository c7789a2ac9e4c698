"""TLS for remote use: the settings that require it, ``serve`` and the stdlib client over
https, against a throwaway CA and server certificate made here (trustme) on loopback."""

from __future__ import annotations

import contextlib
import http.server
import logging
import select
import signal
import ssl
import threading

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from desam_server.api import ServiceSettings, SettingsError
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError

from service_helpers import (
    DIRECTION,
    ORIGIN,
    SPACING,
    free_port,
    id_of,
    live_server,
    phantom_volume,
    serve_process,
    stop_process,
    tiny_settings,
)

TOKEN = "tls-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost, as PEM files."""
    tmp = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp / "ca.pem", "cert": tmp / "server.pem", "key": tmp / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    for i, blob in enumerate(server.cert_chain_pems):
        blob.write_to_path(str(paths["cert"]), append=i > 0)
    server.private_key_pem.write_to_path(str(paths["key"]))
    paths["ca_obj"] = ca
    return paths


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, tiny_sam_checkpoint, certs):
    tmp = tmp_path_factory.mktemp("tls_live")
    settings = tiny_settings(tmp, checkpoint=tiny_sam_checkpoint[0], decoder=False, token=TOKEN,
                             tls_certfile=certs["cert"], tls_keyfile=certs["key"])
    with live_server(settings) as (url, app):
        yield url, app


@contextlib.contextmanager
def stdlib_server(context: ssl.SSLContext | None):
    """A minimal stdlib HTTP(S) server on 127.0.0.1 answering 200 to GET; yields its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"status": "ok"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            pass                      # failed handshakes are what the tests provoke: no traceback on stderr

    server = Server(("127.0.0.1", 0), Handler)
    if context is not None:
        # The handshake runs in the handler's thread, so a failed one never blocks accept().
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)


# ---- the client over https -------------------------------------------------------------------------


def test_client_with_the_ca_file_uploads_and_prompts_over_one_kept_alive_connection(tls_server, certs):
    url, app = tls_server
    assert url.startswith("https://127.0.0.1:")
    c = ServerClient(url, token=TOKEN, ca_file=certs["ca"], timeout=60)
    assert c.health()["status"] == "ok"
    sock = c._local.conn.sock
    assert isinstance(sock, ssl.SSLSocket) and sock.version() in ("TLSv1.2", "TLSv1.3")
    vol = phantom_volume(seed=41)
    vid, sent = c.upload_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)
    assert sent and vid == id_of(vol)
    answer = c.segment_prompt(vid, "k", 2, points=[[30, 24]], labels=[1])
    assert answer.masks.shape == (3, 48, 64) and answer.mask.dtype == bool
    assert c._local.conn.sock is sock                     # every request went over the same TLS socket
    info = c.info()
    assert info["settings"]["tls"] is True and info["settings"]["auth"] is True
    # The certificate names localhost too; the token is still required over TLS.
    host_url = url.replace("127.0.0.1", "localhost")
    assert ServerClient(host_url, token=TOKEN, ca_file=str(certs["ca"])).health()["status"] == "ok"
    with pytest.raises(ServerError) as err:
        ServerClient(url, ca_file=certs["ca"]).health()
    assert err.value.status == 401


def test_a_kept_alive_tls_connection_closed_by_the_service_is_reopened(tls_server, certs):
    """uvicorn closes idle connections after 5 s; the next request reconnects once, silently."""
    url, _ = tls_server
    c = ServerClient(url, token=TOKEN, ca_file=certs["ca"], timeout=30)
    assert c.health()["status"] == "ok"
    sock = c._local.conn.sock
    readable, _, _ = select.select([sock], [], [], 60)      # the service's close_notify / FIN arrives
    assert readable, "the service kept the idle connection open for 60 s"
    assert c.health()["status"] == "ok"
    assert c._local.conn.sock is not sock


def test_client_without_the_ca_gets_a_clear_certificate_error(tls_server, tmp_path):
    url, _ = tls_server
    with pytest.raises(ServerError) as err:
        ServerClient(url, token=TOKEN, timeout=10).health()          # the system's trust store
    assert err.value.status == 0
    message = err.value.message
    assert "TLS certificate could not be verified" in message and "system's trust store" in message
    assert "ServerClient(url, ca_file=...)" in message
    other = tmp_path / "other_ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(ServerError) as err:
        ServerClient(url, token=TOKEN, ca_file=other, timeout=10).health()
    assert err.value.status == 0 and "could not be verified" in err.value.message
    assert str(other) in err.value.message


def test_plain_http_client_to_the_tls_port_fails_cleanly(tls_server, certs):
    url, _ = tls_server
    plain = url.replace("https://", "http://")
    with pytest.raises(ServerError) as err:
        ServerClient(plain, token=TOKEN, timeout=10).health()
    assert err.value.status == 0
    assert "https://" in err.value.message
    # The service keeps serving TLS clients.
    assert ServerClient(url, token=TOKEN, ca_file=certs["ca"], timeout=10).health()["status"] == "ok"


def test_host_name_must_match_the_certificate(certs):
    other = certs["ca_obj"].issue_cert("desam.example")      # trusted CA, but not for 127.0.0.1
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.configure_cert(context)
    with stdlib_server(context) as port:
        with pytest.raises(ServerError) as err:
            ServerClient(f"https://127.0.0.1:{port}", ca_file=certs["ca"], timeout=10).health()
        assert err.value.status == 0 and "could not be verified" in err.value.message
        assert "'127.0.0.1'" in err.value.message and "subjectAltName" in err.value.message


def test_https_client_to_a_plain_http_port_fails_cleanly(certs):
    with stdlib_server(None) as port:
        assert ServerClient(f"http://127.0.0.1:{port}", timeout=10).health() == {"status": "ok"}
        with pytest.raises(ServerError) as err:
            ServerClient(f"https://127.0.0.1:{port}", ca_file=certs["ca"], timeout=10).health()
        assert err.value.status == 0 and "TLS handshake" in err.value.message


def test_client_ca_file_arguments(certs, tmp_path):
    with pytest.raises(ValueError, match="ca_file is for https"):
        ServerClient("http://127.0.0.1:8765", ca_file=certs["ca"])
    with pytest.raises(ValueError, match="cannot load it"):
        ServerClient("https://127.0.0.1:8765", ca_file=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="cannot load it"):
        ServerClient("https://127.0.0.1:8765", ca_file=junk)


# ---- settings -------------------------------------------------------------------------------------


def test_non_loopback_bind_needs_a_token_and_tls_unless_plain_http_is_allowed(certs, caplog):
    with pytest.raises(SettingsError) as err:
        ServiceSettings(host="0.0.0.0", token=TOKEN).check_bind()
    message = str(err.value)
    assert message.startswith("refusing to listen on 0.0.0.0")
    assert "tls_certfile" in message and "tls_keyfile" in message and "allow_insecure_http" in message
    assert "API token" not in message
    with pytest.raises(SettingsError) as err:
        ServiceSettings(host="0.0.0.0").check_bind()
    assert "API token" in str(err.value) and "tls_certfile" in str(err.value)
    with pytest.raises(SettingsError) as err:       # allowing plain HTTP never waives the token
        ServiceSettings(host="0.0.0.0", allow_insecure_http=True).check_bind()
    assert "API token" in str(err.value) and "tls_certfile" not in str(err.value)
    with pytest.raises(SettingsError) as err:
        ServiceSettings(host="192.0.2.7", tls_certfile=certs["cert"], tls_keyfile=certs["key"]).check_bind()
    assert "API token" in str(err.value) and "tls_certfile" not in str(err.value)

    with caplog.at_level(logging.WARNING, logger="desam_server.api.settings"):
        ServiceSettings(host="0.0.0.0", token=TOKEN, tls_certfile=certs["cert"], tls_keyfile=certs["key"]).check_bind()
        assert not caplog.records
        ServiceSettings(host="0.0.0.0", token=TOKEN, allow_insecure_http=True).check_bind()
    assert len(caplog.records) == 1 and "travel in clear" in caplog.records[0].getMessage()
    assert TOKEN not in caplog.text
    # Loopback as before: neither a token nor TLS needed, TLS allowed.
    ServiceSettings(host="127.0.0.1").check_bind()
    ServiceSettings(host="::1").check_bind()
    ServiceSettings(host="localhost", tls_certfile=certs["cert"], tls_keyfile=certs["key"]).check_bind()


def test_tls_files_both_or_neither_and_readable(certs, tmp_path):
    with pytest.raises(SettingsError, match="tls_certfile is set but tls_keyfile is not"):
        ServiceSettings(tls_certfile=certs["cert"])
    with pytest.raises(SettingsError, match="tls_keyfile is set but tls_certfile is not"):
        ServiceSettings(tls_keyfile=certs["key"])
    with pytest.raises(SettingsError, match="tls_certfile: cannot read .*missing.pem"):
        ServiceSettings(tls_certfile=tmp_path / "missing.pem", tls_keyfile=certs["key"])
    with pytest.raises(SettingsError, match="tls_keyfile: cannot read"):
        ServiceSettings(tls_certfile=certs["cert"], tls_keyfile=tmp_path / "missing.key")
    with pytest.raises(SettingsError, match="tls_keyfile: cannot read"):
        ServiceSettings(tls_certfile=certs["cert"], tls_keyfile=tmp_path)      # a folder
    other_key = tmp_path / "other.key"
    certs["ca_obj"].issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    with pytest.raises(SettingsError, match="not a PEM certificate and its matching private key"):
        ServiceSettings(tls_certfile=certs["cert"], tls_keyfile=other_key)
    with pytest.raises(SettingsError, match="not a PEM certificate"):
        ServiceSettings(tls_certfile=certs["ca"].parent / "server.key", tls_keyfile=certs["key"])
    key = serialization.load_pem_private_key(certs["key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(SettingsError, match="tls_keyfile: .* is encrypted"):
        ServiceSettings(tls_certfile=certs["cert"], tls_keyfile=encrypted)
    s = ServiceSettings(tls_certfile=certs["cert"], tls_keyfile=certs["key"])
    assert s.tls and s.public()["tls"] is True and ServiceSettings().public()["tls"] is False


def test_tls_settings_from_config_environment_and_overrides(certs, tmp_path):
    config = tmp_path / "desam.toml"
    config.write_text(f'host = "0.0.0.0"\ntls_certfile = "{certs["cert"]}"\ntls_keyfile = "{certs["key"]}"\n'
                      "allow_insecure_http = false\n")
    s = ServiceSettings.load(config, environ={"DESAM_TOKEN": TOKEN})
    assert (s.tls_certfile, s.tls_keyfile, s.allow_insecure_http) == (certs["cert"], certs["key"], False)
    s.check_bind()
    env = {"DESAM_TOKEN": TOKEN, "DESAM_HOST": "0.0.0.0", "DESAM_ALLOW_INSECURE_HTTP": "true"}
    s = ServiceSettings.load(environ=env)
    assert s.allow_insecure_http is True and not s.tls
    s.check_bind()
    assert ServiceSettings.load(environ={**env, "DESAM_ALLOW_INSECURE_HTTP": "0"}).allow_insecure_http is False
    assert ServiceSettings.load(environ={**env, "DESAM_ALLOW_INSECURE_HTTP": "0"},
                                allow_insecure_http=True).allow_insecure_http is True
    with pytest.raises(SettingsError, match="allow_insecure_http: 'maybe' is not a valid value"):
        ServiceSettings.load(environ={"DESAM_ALLOW_INSECURE_HTTP": "maybe"})
    s = ServiceSettings.load(environ={"DESAM_TLS_CERTFILE": str(certs["cert"]),
                                      "DESAM_TLS_KEYFILE": str(certs["key"])})
    assert s.tls and s.tls_keyfile == certs["key"]
    with pytest.raises(SettingsError, match="tls_certfile is set but tls_keyfile is not"):
        ServiceSettings.load(environ={"DESAM_TLS_CERTFILE": str(certs["cert"])})
    config.write_text("allow_insecure_http = 1\n")                         # TOML: a bool, not a number
    with pytest.raises(SettingsError, match="allow_insecure_http"):
        ServiceSettings.load(config, environ={})


# ---- desam-server serve -------------------------------------------------------------------------------


def test_serve_speaks_https_with_the_tls_flags(tmp_path, certs):
    port = free_port()
    proc = serve_process(tmp_path, "--port", str(port), "--tls-certfile", str(certs["cert"]),
                  "--tls-keyfile", str(certs["key"]))
    try:
        client = ServerClient(f"https://127.0.0.1:{port}", ca_file=certs["ca"], timeout=30)
        assert client.wait_until_ready(timeout=120)["status"] == "ok"
        assert client.info()["settings"]["tls"] is True
        client.close()
    finally:
        status, out = stop_process(proc)
    assert status in (0, -signal.SIGTERM), out
    assert f"starting the DeSAM service on https://127.0.0.1:{port}" in out and "Traceback" not in out


def test_serve_refuses_a_public_bind_without_tls(tmp_path):
    proc = serve_process(tmp_path, "--host", "0.0.0.0", "--port", str(free_port()), env_extra={"DESAM_TOKEN": TOKEN})
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2, out
    assert "error: refusing to listen on 0.0.0.0" in out and "tls_certfile" in out and "allow_insecure_http" in out
    assert TOKEN not in out
