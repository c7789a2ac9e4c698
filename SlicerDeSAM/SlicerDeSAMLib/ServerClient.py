"""HTTP client of the DeSAM service: one method per endpoint.

Python standard library and numpy only (3D Slicer's Python has both), so the Slicer
module ships this file unchanged; the tests, benchmarks and command-line tools use it
too. Every call has a timeout; every non-2xx answer raises ``ServerError`` carrying the
status code, the service's message and ``Retry-After``. ``upload_volume`` computes the
volume's id locally and skips the upload when the service already holds the volume.

Connections are kept alive, one per thread (``http.client``), so a click costs one
request on an open socket. ``https://`` URLs verify the service's certificate and host
name, against the system's trust store or the CA file given as ``ca_file``; verification
is never turned off. Frames and coordinates: see the service's API page
(docs/API.md); payloads: docs/WIRE_FORMAT.md.

The same client works against one ``desam-server serve`` and against a cluster
(``desam-server cluster``, Ray Serve replicas behind Ray's HTTP proxies): every request
about a volume carries the volume's id in the header Ray Serve's proxies route on
(``AFFINITY_HEADER``, Ray's session header), so the cluster sends it to the replica
that holds the volume's features (a single service ignores the header); and a request
that is safe to repeat (GET, PUT, DELETE, a click, an upload, a precompute, a job
cancel) is sent again, for up to ``gateway_retry_s`` seconds, when a gateway answered
instead of the service (a 5xx without the service's JSON ``detail``: the replica died
under the request and Ray is restarting it, or no replica can take it), after the
answer's Retry-After if it has one.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import wire
from .PromptResult import PromptResult
from .ServerError import ServerError
from .TrainingJobsClient import TRAINING_FINAL_EVENTS, TrainingJobsClient, parse_event_stream

__all__ = ["ServerClient", "ServerError", "PromptResult", "parse_event_stream", "TRAINING_FINAL_EVENTS"]

DEFAULT_URL = "http://127.0.0.1:8765"
#: The header Ray Serve's proxies take the session id from (its default name); the value is
#: the id of the volume a request is about, the key of the cluster's consistent-hash routing.
AFFINITY_HEADER = "X-Session-Id"
_GATEWAY_STATUSES = (500, 502, 503, 504)
_REPEATABLE_METHODS = ("GET", "HEAD", "PUT", "DELETE")
_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH = 62, 64    # OpenSSL's X509_V_ERR_* verify codes


def _segment(text: str) -> str:
    """``text`` as one URL path segment."""
    return urllib.parse.quote(str(text), safe="")


def _window(window) -> dict | None:
    if window is None:
        return None
    center, width = window
    return {"center": float(center), "width": float(width)}


class ServerClient(TrainingJobsClient):
    """``url``: the service (default http://127.0.0.1:8765); ``token``: its API token, if
    it has one; ``timeout``: seconds per request (uploads and results get
    ``upload_timeout``); ``ca_file``: for an ``https://`` URL, a PEM file of the CA
    certificate(s) to trust instead of the system's store (e.g. the service's own
    self-signed certificate, or the small CA that signed it); ``affinity``: send the
    volume id in ``AFFINITY_HEADER`` (turned off only to measure a cluster without
    affinity); ``gateway_retry_s``: how long a repeatable request is retried after gateway
    errors (0: never)."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout: float = 60.0,
                 upload_timeout: float = 600.0, ca_file: str | os.PathLike | None = None, affinity: bool = True,
                 gateway_retry_s: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"service URL must be http(s)://host[:port], got {url!r}")
        if ca_file is not None and parts.scheme != "https":
            raise ValueError(f"ca_file is for https:// URLs; {url!r} is plain http")
        self._ssl_context: ssl.SSLContext | None = None
        if parts.scheme == "https":
            # Certificate and host name checked (CERT_REQUIRED, check_hostname): the default context.
            try:
                self._ssl_context = ssl.create_default_context(
                    cafile=None if ca_file is None else os.fspath(ca_file))
            except (OSError, ssl.SSLError) as exc:
                what = "the system's trust store" if ca_file is None else f"ca_file {os.fspath(ca_file)!r}"
                raise ValueError(f"{what}: cannot load it as PEM CA certificates ({exc})") from None
        self.ca_file = ca_file
        self.url = url.rstrip("/")
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._base = parts.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.upload_timeout = upload_timeout
        self.affinity = affinity
        self.gateway_retry_s = gateway_retry_s
        self.gateway_retries = 0          # requests sent again after a gateway error (all threads)
        self._local = threading.local()

    # ---- transport --------------------------------------------------------------------------
    def _new_connection(self, timeout: float) -> http.client.HTTPConnection:
        """A connection to the service (https with the client's verifying context)."""
        if self._ssl_context is not None:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl_context)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        headers = {"Accept": accept}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._new_connection(timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _request(self, method: str, path: str, *, body: bytes | None = None, json_body: Any = None,
                 content_type: str | None = None, timeout: float | None = None, volume_id: str | None = None,
                 repeatable: bool | None = None) -> tuple[int, dict, bytes]:
        """``volume_id``: the volume the request is about (sent for the cluster's affinity);
        ``repeatable``: whether sending the request twice is harmless (default: for GET,
        HEAD, PUT and DELETE)."""
        headers = self._headers()
        if json_body is not None:
            body = json.dumps(json_body, allow_nan=False).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        if volume_id and self.affinity:
            headers[AFFINITY_HEADER] = volume_id
        if repeatable is None:
            repeatable = method in _REPEATABLE_METHODS
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + self.gateway_retry_s
        pause = 0.25
        attempt = 0
        while True:
            conn = self._connection(timeout)
            reused = conn.sock is not None
            try:
                conn.request(method, self._base + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise ServerError(0, self._certificate_message(exc), method=method, path=path) from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ssl.SSLEOFError,
                    ssl.SSLZeroReturnError) as exc:
                self.close()
                if reused and attempt == 0:
                    attempt = 1
                    continue          # the kept-alive socket had been closed by the service: retry once
                hint = (" (if the service uses TLS, its URL starts with https://)"
                        if self._scheme == "http" and not reused else "")
                raise ServerError(0, f"connection lost: {exc}{hint}", method=method, path=path) from None
            except TimeoutError:
                self.close()
                raise ServerError(0, f"no answer within {timeout:g} s", method=method, path=path) from None
            except ssl.SSLError as exc:
                self.close()
                raise ServerError(0, f"TLS handshake with {self.url} failed: {exc} (does the service speak https "
                                  "on this port?)", method=method, path=path) from None
            except OSError as exc:
                self.close()
                raise ServerError(0, f"cannot reach the service at {self.url}: {exc}", method=method,
                                  path=path) from None
            if response.getheader("Connection", "").lower() == "close":
                self.close()
            if response.status >= 400:
                error = self._error(response, data, method, path)
                left = deadline - time.monotonic()
                if repeatable and left > 0 and self._from_gateway(response.status, data):
                    wait = min(left, error.retry_after if error.retry_after is not None else pause)
                    pause = min(2 * pause, 2.0)
                    self.gateway_retries += 1
                    time.sleep(max(wait, 0.0))
                    continue
                raise error
            return response.status, dict(response.getheaders()), data

    @staticmethod
    def _from_gateway(status: int, data: bytes) -> bool:
        """A 5xx that the service did not write: every answer of the service's own carries a
        JSON ``detail``; a proxy's (Ray Serve's, when the replica died under the request or
        none can take it) does not."""
        if status not in _GATEWAY_STATUSES:
            return False
        try:
            return "detail" not in json.loads(data)
        except (ValueError, TypeError):
            return True

    def _certificate_message(self, exc: ssl.SSLCertVerificationError) -> str:
        reason = exc.verify_message or str(exc)
        if exc.verify_code in (_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH):
            return (f"the service's TLS certificate could not be verified ({reason}): the URL's host "
                    f"{self._host!r} must be one of the names or addresses in the certificate's subjectAltName")
        trusted = (f"the CA file {os.fspath(self.ca_file)!r}" if self.ca_file is not None
                   else "the system's trust store")
        return (f"the service's TLS certificate could not be verified ({reason}) against {trusted}: pass the "
                "CA certificate that signed it (or the service's self-signed certificate) as "
                "ServerClient(url, ca_file=...)")

    @staticmethod
    def _error(response, data: bytes, method: str, path: str) -> ServerError:
        message = response.reason or "error"
        try:
            detail = json.loads(data).get("detail", message)
            message = detail if isinstance(detail, str) else json.dumps(detail)
        except (ValueError, AttributeError):
            pass
        retry = response.getheader("Retry-After")
        try:
            retry_after = float(retry) if retry is not None else None
        except ValueError:
            retry_after = None
        return ServerError(response.status, message, retry_after=retry_after, method=method, path=path)

    def _json(self, method: str, path: str, payload: Any = None, timeout: float | None = None, *,
              volume_id: str | None = None, repeatable: bool | None = None) -> Any:
        _, _, data = self._request(method, path, json_body=payload, timeout=timeout, volume_id=volume_id,
                                   repeatable=repeatable)
        return json.loads(data) if data else None

    # ---- service ------------------------------------------------------------------------------
    def health(self) -> dict:
        return self._json("GET", "/health")

    def info(self) -> dict:
        return self._json("GET", "/info")

    def decoders(self) -> list[dict]:
        return self._json("GET", "/decoders")["decoders"]

    def wait_until_ready(self, timeout: float = 120.0, poll: float = 0.25) -> dict:
        """Poll /health until the service answers 200 (it loads its model at start)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.health()
            except ServerError as exc:
                if exc.status not in (0, 503) or time.monotonic() > deadline:
                    raise
            time.sleep(poll)

    # ---- decoder registry -------------------------------------------------------------------------
    def registry(self) -> list[dict]:
        """Every structure in the service's decoder registry: versions, active, served."""
        return self._json("GET", "/registry")["structures"]

    def registry_structure(self, structure: str) -> dict:
        return self._json("GET", f"/registry/{_segment(structure)}")

    def activate_decoder(self, structure: str, version: str) -> dict:
        """Serve ``version`` under the structure's name from now on (no restart)."""
        return self._json("PUT", f"/registry/{_segment(structure)}/active", {"version": version})

    def rollback_decoder(self, structure: str) -> dict:
        """Back to the version active before the present one."""
        return self._json("POST", f"/registry/{_segment(structure)}/rollback")

    def decoder_record(self, structure: str, version: str) -> dict:
        """The version with its training record (``metadata``)."""
        return self._json("GET", f"/registry/{_segment(structure)}/versions/{_segment(version)}")

    def decoder_curve(self, structure: str, version: str) -> bytes:
        """The version's training-curve PNG (ServerError 404 when it has none)."""
        _, _, data = self._request("GET", f"/registry/{_segment(structure)}/versions/{_segment(version)}/curve")
        return data

    def delete_decoder_version(self, structure: str, version: str) -> None:
        self._request("DELETE", f"/registry/{_segment(structure)}/versions/{_segment(version)}")

    # ---- volumes --------------------------------------------------------------------------------
    def volumes(self) -> list[str]:
        return self._json("GET", "/volumes")["volumes"]

    def volume(self, volume_id: str) -> dict:
        return self._json("GET", f"/volumes/{volume_id}", volume_id=volume_id)

    def has_volume(self, volume_id: str) -> bool:
        try:
            self.volume(volume_id)
            return True
        except ServerError as exc:
            if exc.status == 404:
                return False
            raise

    def upload_volume(self, array: np.ndarray, *, spacing, origin, direction, force: bool = False) -> tuple[str, bool]:
        """Send a K x J x I volume with its LPS geometry unless the service has it;
        returns (volume id, whether bytes were sent)."""
        volume_id = wire.volume_id(array, spacing=spacing, origin=origin, direction=direction)
        if not force and self.has_volume(volume_id):
            return volume_id, False
        payload = wire.encode_volume(array, spacing=spacing, origin=origin, direction=direction)
        _, _, data = self._request("POST", "/volumes", body=payload, content_type="application/octet-stream",
                                   timeout=self.upload_timeout, volume_id=volume_id, repeatable=True)
        got = json.loads(data)["volume_id"]
        if got != volume_id:
            raise ServerError(0, f"the service computed volume id {got[:12]}, this client {volume_id[:12]}",
                              method="POST", path="/volumes")
        return volume_id, True

    def delete_volume(self, volume_id: str) -> None:
        self._request("DELETE", f"/volumes/{volume_id}", volume_id=volume_id)

    def set_view(self, volume_id: str, axis: str, index: int, window=None, *, decoder: str | None = None) -> dict:
        """Tell the service which slice is on screen (it encodes that one first); with a
        DB-SAM or SAM-Mix model's name, with that model's own encoder."""
        return self._json("PUT", f"/volumes/{volume_id}/view",
                          {"axis": axis, "index": int(index), "window": _window(window), "decoder": decoder},
                          volume_id=volume_id)

    def precompute(self, volume_id: str, axis: str = "k", window=None, cancel: bool = False, *,
                   decoder: str | None = None) -> dict:
        return self._json("POST", f"/volumes/{volume_id}/precompute",
                          {"axis": axis, "window": _window(window), "cancel": bool(cancel), "decoder": decoder},
                          volume_id=volume_id, repeatable=True)

    def progress(self, volume_id: str, axis: str = "k", window=None, *, decoder: str | None = None) -> dict:
        """Slices of the axis cached, queued and running for ``window`` (center, width;
        default: the volume's default window)."""
        query = [("axis", axis)]
        if window is not None:
            w = _window(window)
            query += [("window", w["center"]), ("window", w["width"])]  # window=<center>&window=<width>
        if decoder is not None:
            query.append(("decoder", decoder))
        return self._json("GET", f"/volumes/{volume_id}/progress?" + urllib.parse.urlencode(query),
                          volume_id=volume_id)

    # ---- segmentation ---------------------------------------------------------------------------
    def segment_prompt(self, volume_id: str, axis: str, index: int, *, points: Sequence | None = None,
                       labels: Sequence[int] | None = None, box: Sequence[float] | None = None,
                       logits_id: str | None = None, mask: np.ndarray | None = None, multimask: bool = True,
                       decoder: str = "sam", window=None) -> PromptResult:
        """One slice from points (x, y in slice pixels, labels 1/0) and/or a box (x0, y0,
        x1, y1); refine a previous answer with its ``logits_id`` or the slice's current
        binary ``mask`` (H x W)."""
        body: dict[str, Any] = {"volume_id": volume_id, "axis": axis, "index": int(index),
                                "multimask": bool(multimask), "decoder": decoder, "window": _window(window)}
        if points is not None:
            body["points"] = np.asarray(points, dtype=float).reshape(-1, 2).tolist()
            body["labels"] = [int(v) for v in (labels if labels is not None else [1] * len(body["points"]))]
        if box is not None:
            body["box"] = [float(v) for v in box]
        if logits_id is not None or mask is not None:
            body["mask_input"] = {"logits_id": logits_id}
            if mask is not None:
                payload = wire.encode_mask(np.asarray(mask, bool), axis=axis, offset=int(index))
                body["mask_input"]["mask"] = base64.b64encode(payload).decode("ascii")
        answer = self._json("POST", "/segment/prompt", body, volume_id=volume_id, repeatable=True)
        masks = [wire.decode_mask(base64.b64decode(m["mask"])).mask for m in answer["masks"]]
        return PromptResult(axis=answer["axis"], index=answer["index"], masks=np.stack(masks),
                            ious=np.array([m["iou"] for m in answer["masks"]], dtype=np.float32),
                            areas=[m["area"] for m in answer["masks"]],
                            logits_ids=[m["logits_id"] for m in answer["masks"]], best=answer["best"],
                            decoder=answer["decoder"], timing=answer.get("timing", {}))

    def segment_auto(self, volume_id: str, *, axis: str = "k", start: int | None = None, stop: int | None = None,
                     mode: str = "box", decoder: str | None = None, window=None, grid_size: int = 9,
                     iou_threshold: float = 0.5, min_region_area: int = 64, box: Sequence[float] | None = None,
                     presence_threshold: float | None = None, omega: float | None = None,
                     largest_only: bool | None = None) -> dict:
        """Start an automatic segmentation of slices [start, stop) as a job: DeSAM's 'box'
        or 'grid' mode, 'roi' (``box``, x0 y0 x1 y1 in slice pixels, on every slice) or
        'cam-box' (a SAM-Mix model: ``presence_threshold``, ``omega``, ``largest_only``; None:
        the model's own)."""
        return self._json("POST", "/segment/auto", {
            "volume_id": volume_id, "axis": axis, "start": start, "stop": stop, "mode": mode, "decoder": decoder,
            "window": _window(window), "grid_size": grid_size, "iou_threshold": iou_threshold,
            "min_region_area": min_region_area, "box": None if box is None else [float(v) for v in box],
            "presence_threshold": None if presence_threshold is None else float(presence_threshold),
            "omega": None if omega is None else float(omega),
            "largest_only": None if largest_only is None else bool(largest_only)}, volume_id=volume_id)

    def segment_propagate(self, volume_id: str, axis: str, index: int, mask: np.ndarray, *, decoder: str = "sam",
                          start: int | None = None, stop: int | None = None, iou_threshold: float = 0.5,
                          min_area: int = 16, min_area_ratio: float = 0.2, max_area_ratio: float = 3.0,
                          window=None) -> dict:
        """Start a propagation job from slice ``index`` of ``axis`` whose mask (H x W bool,
        not empty) is given: each neighbour in both directions is prompted by the box around
        its neighbour's mask, until the predicted IoU falls below ``iou_threshold``, the area
        below ``min_area`` pixels, the area relative to the previous slice's below
        ``min_area_ratio`` or above ``max_area_ratio``, or at the bounds [start, stop).
        Returns the job's status; follow it with ``wait_job`` (``slices``, ``reached``) and
        fetch the slab from the first to the last slice reached with ``job_result``."""
        payload = wire.encode_mask(np.asarray(mask, bool), axis=axis, offset=int(index), volume_id=volume_id)
        return self._json("POST", "/segment/propagate", {
            "volume_id": volume_id, "axis": axis, "index": int(index),
            "mask": base64.b64encode(payload).decode("ascii"), "decoder": decoder,
            "start": None if start is None else int(start), "stop": None if stop is None else int(stop),
            "iou_threshold": float(iou_threshold), "min_area": int(min_area),
            "min_area_ratio": float(min_area_ratio), "max_area_ratio": float(max_area_ratio),
            "window": _window(window)}, volume_id=volume_id)

    # ---- labels (training data) -------------------------------------------------------------------
    @staticmethod
    def _label_path(volume_id: str, structure: str) -> str:
        return f"/volumes/{volume_id}/labels/{urllib.parse.quote(structure, safe='')}"

    def put_label(self, volume_id: str, structure: str, mask: np.ndarray) -> dict:
        """Store the label of ``structure`` (e.g. a Slicer segment's name, "Left kidney") for
        an uploaded volume: a non-empty bool K x J x I mask of the volume's shape. Replaces
        an earlier label of that structure; returns its description (voxels, slices)."""
        payload = wire.encode_mask(np.asarray(mask), axis="k", offset=0, volume_id=volume_id)
        _, _, data = self._request("PUT", self._label_path(volume_id, structure), body=payload,
                                   content_type="application/octet-stream", timeout=self.upload_timeout,
                                   volume_id=volume_id)
        return json.loads(data)

    def list_labels(self, volume_id: str) -> dict:
        """``{"volume_id", "volume_available", "labels": [...]}``: the volume's labels."""
        return self._json("GET", f"/volumes/{volume_id}/labels", volume_id=volume_id)

    def get_label(self, volume_id: str, structure: str) -> np.ndarray:
        """The stored label as a bool K x J x I array."""
        _, _, data = self._request("GET", self._label_path(volume_id, structure), timeout=self.upload_timeout,
                                   volume_id=volume_id)
        decoded = wire.decode_mask(data)
        if decoded.mask.ndim != 3 or decoded.axis != "k" or decoded.offset != 0:
            raise ServerError(0, f"the service answered a mask {decoded.mask.shape} along {decoded.axis} at "
                              f"{decoded.offset}, not a whole label volume", method="GET",
                              path=self._label_path(volume_id, structure))
        return decoded.mask

    def delete_label(self, volume_id: str, structure: str) -> None:
        self._request("DELETE", self._label_path(volume_id, structure), volume_id=volume_id)

    # ---- jobs -------------------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        return self._json("GET", "/jobs")["jobs"]

    def job(self, job_id: str) -> dict:
        return self._json("GET", f"/jobs/{job_id}")

    def cancel_job(self, job_id: str) -> dict:
        return self._json("POST", f"/jobs/{job_id}/cancel", repeatable=True)

    def job_result(self, job_id: str) -> wire.DecodedMask:
        """The job's N x H x W mask slab (``offset``: its first slice along ``axis``)."""
        _, _, data = self._request("GET", f"/jobs/{job_id}/result", timeout=self.upload_timeout)
        return wire.decode_mask(data)

    def wait_job(self, job_id: str, *, timeout: float | None = None, poll: float = 0.5,
                 on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the job has finished; returns its final state (check ``state``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] not in ("queued", "running"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id[:8]} still {job['state']} after {timeout} s")
            time.sleep(poll)
