"""The service's settings: defaults < config file (TOML) < DESAM_* environment < flags.

``ServiceSettings.load(config_file, environ, **overrides)`` builds them. The config file
uses the field names below as keys (a ``[cache]`` table for the feature cache); each
environment variable is ``DESAM_`` + the field name in capitals (``DESAM_PORT``,
``DESAM_VOLUME_DISK_BYTES``, ...), and the feature cache keeps its own ``DESAM_CACHE_*``
variables (``FeatureCacheSettings.from_env``). Byte sizes accept ``4GiB`` and the like.

Beyond loopback the service needs a token and TLS (``tls_certfile`` + ``tls_keyfile``);
``allow_insecure_http`` waives TLS there, and the token then travels in clear.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..decoder_registry import default_registry_dir
from ..engine.feature_config import FeatureCacheSettings, GiB, parse_bytes
from ..modeling.fast_path import FastPath

__all__ = ["ServiceSettings", "SettingsError", "default_volume_dir", "default_training_dir", "is_loopback"]

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting has an invalid value (the message names the setting)."""


def default_volume_dir() -> Path:
    """~/.cache/slicer-desam/volumes (beside the feature cache)."""
    return Path.home() / ".cache" / "slicer-desam" / "volumes"


def default_training_dir() -> Path:
    """~/.cache/slicer-desam/training-jobs: the training jobs' folders."""
    return Path.home() / ".cache" / "slicer-desam" / "training-jobs"


def _default_training_features_dir() -> Path:
    from ..training.run import default_training_features_dir

    return default_training_features_dir()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServiceSettings:
    """host / port: where ``serve`` listens (loopback by default); token: the API token
    (required when host is not loopback; then every request must carry it);
    tls_certfile / tls_keyfile: the server certificate (PEM, chain included) and its
    unencrypted private key; both or neither; with them ``serve`` speaks https (required
    when host is not loopback, unless allow_insecure_http: then the token travels in clear);
    cors_origins: origins allowed by CORS (empty: CORS off).

    encoder: registry name (None: the catalog default, MobileSAM); sam_checkpoint: a
    SAM-family checkpoint (None: the catalog's cached weights for MobileSAM/LiteMedSAM;
    SAM ViTs need a file, or an official one already in the weights cache); decoders:
    DeSAM decoder files to load at start; decoder_dir: every ``*.safetensors`` decoder in this folder is loaded too;
    registry_dir: the decoder registry (``decoder_registry``; default ``default_registry_dir()``,
    ``$XDG_DATA_HOME/slicer-desam/decoders``; 'off': none), whose active version of every
    structure is served under the structure's name (a decoder file of the same name wins);
    device: auto/cpu/cuda/cuda:N; precision: the encoder's autocast.

    volume_dir / volume_disk_bytes: where uploaded volumes persist and their budget
    (None dir: volumes live in memory only); volume_memory_bytes: decoded volumes kept in
    memory; max_upload_bytes: largest request body; max_voxels: largest volume;
    max_points: most points in one prompt; click_timeout_s: longest a prompt waits for its
    slice to be encoded (then 503); max_pending_prompts: prompts waiting for the encoder
    before new ones get 429; max_jobs: queued + running automatic jobs before 429;
    finished_jobs_kept: finished jobs remembered (with results); training_dir: the
    training jobs' folders (removed with their job; default
    ~/.cache/slicer-desam/training-jobs); training_features_dir: the training processes'
    feature cache (default ``training.run.default_training_features_dir()``, the one
    ``desam-server train`` uses); training_jobs_kept: ended training jobs remembered;
    training_threads: PyTorch CPU threads of a training job's process (0: one less than
    the machine's cores, at least 1, so that clicks keep a core); encode_batch and
    neighbours: the scheduler's; fast_path: the decoders' inference fast path ('all', the
    default; 'none': the modules as written; 'without:PART,PART': all but those parts of
    ``modeling.FastPath`` -- for diagnosis and the side-by-side benchmark); cache: the
    feature cache's settings.
    """

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = field(default=None, repr=False)
    tls_certfile: Path | None = None
    tls_keyfile: Path | None = None
    allow_insecure_http: bool = False
    cors_origins: tuple[str, ...] = ()
    encoder: str | None = None
    sam_checkpoint: Path | None = None
    decoders: tuple[Path, ...] = ()
    decoder_dir: Path | None = None
    registry_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    volume_dir: Path | None = None
    volume_disk_bytes: int = 20 * GiB
    volume_memory_bytes: int = 4 * GiB
    max_upload_bytes: int = 1 * GiB
    max_voxels: int = 1 << 29
    max_points: int = 64
    click_timeout_s: float = 60.0
    max_pending_prompts: int = 32
    max_jobs: int = 8
    finished_jobs_kept: int = 64
    training_dir: Path = field(default_factory=default_training_dir)
    training_features_dir: Path = field(default_factory=_default_training_features_dir)
    training_jobs_kept: int = 16
    training_threads: int = 0
    encode_batch: int = 1
    neighbours: int = 8
    fast_path: str = "all"
    log_level: str = "info"
    cache: FeatureCacheSettings = field(default_factory=FeatureCacheSettings)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise SettingsError(f"port must be 0..65535, got {self.port!r}")
        if self.token is not None and len(self.token) < 16:
            raise SettingsError("token must be at least 16 characters (use e.g. `python -c "
                                "\"import secrets; print(secrets.token_urlsafe(32))\"`)")
        for name in ("volume_disk_bytes", "volume_memory_bytes", "max_upload_bytes", "max_voxels"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{name} must not be negative")
        for name in ("max_points", "max_pending_prompts", "max_jobs", "finished_jobs_kept", "encode_batch",
                     "training_jobs_kept"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.training_threads < 0:
            raise SettingsError(f"training_threads must be >= 0 (0: automatic), got {self.training_threads}")
        if self.neighbours < 0 or not self.click_timeout_s > 0:
            raise SettingsError("neighbours must be >= 0 and click_timeout_s > 0")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise SettingsError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        try:
            self.decoder_fast_path()
        except ValueError as exc:
            raise SettingsError(f"fast_path: {exc}") from None
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"log_level must be debug, info, warning or error, got {self.log_level!r}")
        if not isinstance(self.allow_insecure_http, bool):
            raise SettingsError(f"allow_insecure_http must be true or false, got {self.allow_insecure_http!r}")
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            given, missing = (("tls_certfile", "tls_keyfile") if self.tls_keyfile is None
                              else ("tls_keyfile", "tls_certfile"))
            raise SettingsError(f"{given} is set but {missing} is not: TLS needs both the certificate "
                                "(tls_certfile) and its private key (tls_keyfile), or neither")
        if self.tls_certfile is not None:
            _check_tls_files(self.tls_certfile, self.tls_keyfile)

    @property
    def tls(self) -> bool:
        """Whether ``serve`` speaks https (a certificate and key are set)."""
        return self.tls_certfile is not None

    def decoder_fast_path(self) -> FastPath | None:
        """``fast_path`` as the ``FastPath`` the predictors get (None: the modules)."""
        text = self.fast_path.strip()
        if text == "all":
            return FastPath()
        if text == "none":
            return None
        if text.startswith("without:"):
            return FastPath.without(*(p.strip() for p in text[len("without:"):].split(",") if p.strip()))
        raise ValueError(f"{text!r} is not 'all', 'none' or 'without:PART,...'")

    def training_process_threads(self) -> int:
        """``training_threads``, 0 resolved: the machine's cores less one, at least 1."""
        return self.training_threads or max(1, (os.cpu_count() or 1) - 1)

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without a token, or without TLS unless
        ``allow_insecure_http`` (then warn: the token travels in clear). Loopback needs neither."""
        if is_loopback(self.host):
            return
        needs = []
        if not self.token:
            needs.append("an API token (DESAM_TOKEN, DESAM_TOKEN_FILE or token_file in the config file)")
        if not self.tls and not self.allow_insecure_http:
            needs.append("TLS (tls_certfile and tls_keyfile: --tls-certfile/--tls-keyfile, "
                         "DESAM_TLS_CERTFILE/DESAM_TLS_KEYFILE or the config file)")
        if needs:
            plain = "" if self.tls or self.allow_insecure_http else (
                "; or set allow_insecure_http to accept plain HTTP, where the token travels in clear")
            raise SettingsError(
                f"refusing to listen on {self.host}: the service is reachable from other machines there, "
                f"so it needs {' and '.join(needs)}; or bind 127.0.0.1{plain}")
        if not self.tls:
            log.warning("listening on %s over plain HTTP (allow_insecure_http): the API token and the images "
                        "travel in clear; anyone on the network path can read them and use the token", self.host)

    def public(self) -> dict[str, Any]:
        """What ``info`` may show: no token, no paths."""
        return {"host": self.host, "port": self.port, "auth": self.token is not None, "tls": self.tls,
                "cors": bool(self.cors_origins), "device": self.device, "precision": self.precision,
                "volume_store": self.volume_dir is not None, "decoder_registry": self.registry_dir is not None,
                "volume_disk_bytes": self.volume_disk_bytes,
                "volume_memory_bytes": self.volume_memory_bytes, "max_upload_bytes": self.max_upload_bytes,
                "max_voxels": self.max_voxels, "max_points": self.max_points,
                "click_timeout_s": self.click_timeout_s, "max_pending_prompts": self.max_pending_prompts,
                "max_jobs": self.max_jobs, "encode_batch": self.encode_batch, "neighbours": self.neighbours,
                "fast_path": self.fast_path, "training_jobs_kept": self.training_jobs_kept,
                "training_threads": self.training_process_threads(),
                "cache": self.cache.to_json()}

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, config_file: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None,
             **overrides: Any) -> ServiceSettings:
        """Defaults, then the config file (``DESAM_CONFIG`` when ``config_file`` is None),
        then the environment, then ``overrides`` whose value is not None."""
        env = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        cache_values: dict[str, Any] = {}
        path = config_file or env.get("DESAM_CONFIG") or None
        if path:
            values, cache_values = _read_config(Path(path))
        for f in dataclasses.fields(cls):
            if f.name == "cache":
                continue
            raw = env.get("DESAM_" + f.name.upper(), "").strip()
            if raw:
                values[f.name] = raw
        token_file = env.get("DESAM_TOKEN_FILE", "").strip() or values.pop("token_file", None)
        if token_file and not env.get("DESAM_TOKEN"):
            try:
                values["token"] = Path(token_file).expanduser().read_text().strip()
            except OSError as exc:
                raise SettingsError(f"token_file: cannot read it ({exc.strerror})") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        kwargs = {name: _convert(name, value) for name, value in values.items()}
        kwargs.setdefault("volume_dir", default_volume_dir())
        if kwargs["volume_dir"] == "off":
            kwargs["volume_dir"] = None
        kwargs.setdefault("registry_dir", default_registry_dir(env))
        if kwargs["registry_dir"] == "off":
            kwargs["registry_dir"] = None
        device = kwargs.get("device", "auto")
        try:
            cache_env = {**{"DESAM_CACHE_" + k.upper(): str(v) for k, v in cache_values.items()},
                         **{k: v for k, v in env.items() if k.startswith("DESAM_CACHE_")}}
            kwargs["cache"] = FeatureCacheSettings.from_env(cache_env, device=_cache_device(device))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        return cls(**kwargs)


_INTS = {"port", "max_points", "max_pending_prompts", "max_jobs", "finished_jobs_kept", "encode_batch", "neighbours",
         "max_voxels", "training_jobs_kept", "training_threads"}
_BYTES = {"volume_disk_bytes", "volume_memory_bytes", "max_upload_bytes"}
_PATHS = {"sam_checkpoint", "decoder_dir", "registry_dir", "volume_dir", "tls_certfile", "tls_keyfile", "training_dir",
          "training_features_dir"}
_BOOLS = {"allow_insecure_http"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_STRINGS = {"host", "token", "encoder", "device", "precision", "log_level", "fast_path"}


def _convert(name: str, value: Any) -> Any:
    """A config/env/flag value -> the field's type; SettingsError naming the setting."""
    try:
        if name in _INTS:
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if name in _BYTES:
            return value if isinstance(value, int) and not isinstance(value, bool) else parse_bytes(str(value), name)
        if name == "click_timeout_s":
            return float(value)
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            text = value.strip().lower() if isinstance(value, str) else None   # TOML: true/false, not 1/0
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            raise ValueError
        if name in _PATHS:
            text = str(value).strip()
            off = name in ("volume_dir", "registry_dir") and text.lower() in ("off", "none")
            return "off" if off else Path(text).expanduser()
        if name in ("decoders", "cors_origins"):
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [str(v).strip() for v in items if str(v).strip()]
            return tuple(Path(v).expanduser() for v in items) if name == "decoders" else tuple(items)
        if name in _STRINGS:
            return str(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a valid value") from None
    raise SettingsError(f"unknown setting {name!r}")


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey  # never prompt on the terminal for a key password


def _check_tls_files(certfile: Path, keyfile: Path) -> None:
    """Both files readable, and a PEM certificate with its matching unencrypted key:
    SettingsError naming the setting otherwise (before uvicorn fails with a traceback)."""
    for name, path in (("tls_certfile", certfile), ("tls_keyfile", keyfile)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {path} ({exc.strerror})") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(certfile, keyfile, password=_no_password)
    except _EncryptedKey:
        raise SettingsError(f"tls_keyfile: {keyfile} is encrypted; give an unencrypted key (e.g. "
                            "`openssl pkey -in KEY -out KEY.plain`) readable only by the service's user") from None
    except ssl.SSLError as exc:
        raise SettingsError(f"tls_certfile / tls_keyfile: {certfile} and {keyfile} are not a PEM certificate and "
                            f"its matching private key ({exc})") from None


def _read_config(path: Path) -> tuple[dict, dict]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path}: not valid TOML ({exc})") from None
    cache = data.pop("cache", {})
    if not isinstance(cache, dict):
        raise SettingsError(f"config file {path}: [cache] must be a table")
    known = {f.name for f in dataclasses.fields(ServiceSettings)} - {"cache"} | {"token_file"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return data, cache


def _cache_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device

