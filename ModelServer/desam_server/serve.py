"""``desam-server serve``: run the HTTP service with uvicorn (127.0.0.1:8765 by default).

Flags override DESAM_* environment variables, which override the config file
(``--config`` or DESAM_CONFIG). The API token is never a flag (flags show in process
lists): set DESAM_TOKEN, DESAM_TOKEN_FILE or ``token_file`` in the config file.
Beyond loopback the service also needs TLS (``--tls-certfile`` and ``--tls-keyfile``)
unless ``--allow-insecure-http`` says plain HTTP is meant.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("desam_server")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_service_args(p)
    p.add_argument("--exit-with-parent", type=int, default=None, metavar="PID",
                   help="shut down when the process PID (this service's parent, e.g. Slicer) has exited (POSIX)")


def add_service_args(p: argparse.ArgumentParser) -> None:
    """The service's settings as flags (``serve`` and ``cluster``)."""
    from .modeling import ENCODERS

    p.add_argument("--config", type=Path, default=None, help="TOML config file (default: $DESAM_CONFIG)")
    p.add_argument("--host", default=None,
                   help="address to bind (default 127.0.0.1; others need a token and TLS)")
    p.add_argument("--port", type=int, default=None, help="port (default 8765)")
    p.add_argument("--tls-certfile", type=Path, default=None, metavar="PEM",
                   help="serve https with this certificate (PEM, chain included); needs --tls-keyfile")
    p.add_argument("--tls-keyfile", type=Path, default=None, metavar="KEY",
                   help="the certificate's private key (PEM, unencrypted)")
    p.add_argument("--allow-insecure-http", action="store_true", default=None,
                   help="allow a non-loopback host without TLS (the token and images travel in clear)")
    p.add_argument("--encoder", default=None, choices=sorted(ENCODERS),
                   help="image encoder (default: MobileSAM, the embedded default)")
    p.add_argument("--sam-checkpoint", type=Path, default=None, help="SAM-family checkpoint (e.g. ViT-H)")
    p.add_argument("--decoder", type=Path, action="append", default=None,
                   help="trained DeSAM decoder file to load (repeatable)")
    p.add_argument("--decoder-dir", type=Path, default=None, help="load every *.safetensors decoder in this folder")
    p.add_argument("--registry-dir", default=None,
                   help="the decoder registry whose active versions are served (default "
                        "$XDG_DATA_HOME/slicer-desam/decoders; 'off': none)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--volume-dir", default=None, help="where uploaded volumes persist ('off': memory only)")
    p.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace):
    """``ServiceSettings`` from the flags of ``add_service_args`` over the environment and config file."""
    from .api import ServiceSettings

    return ServiceSettings.load(
        args.config, host=args.host, port=args.port, tls_certfile=args.tls_certfile, tls_keyfile=args.tls_keyfile,
        allow_insecure_http=args.allow_insecure_http, encoder=args.encoder, sam_checkpoint=args.sam_checkpoint,
        decoders=args.decoder, decoder_dir=args.decoder_dir,
        registry_dir=args.registry_dir, device=args.device, precision=args.precision,
        volume_dir=args.volume_dir, log_level=args.log_level)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app

    settings = settings_from_args(args)
    settings.check_bind()
    watch = None
    if args.exit_with_parent is not None:
        from .parent_watch import ParentWatch

        try:
            watch = ParentWatch(args.exit_with_parent)
        except ValueError as exc:
            raise SystemExit(f"desam-server serve: {exc}") from None
    logging.getLogger().setLevel(settings.log_level.upper())
    log.info("starting the DeSAM service on %s://%s:%d (auth %s)", "https" if settings.tls else "http",
             settings.host, settings.port, "on" if settings.token else "off")
    tls = {"ssl_certfile": settings.tls_certfile, "ssl_keyfile": settings.tls_keyfile} if settings.tls else {}
    if watch is not None:
        watch.start()
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                    timeout_graceful_shutdown=30, access_log=settings.log_level == "debug", **tls)
    finally:
        if watch is not None:
            watch.stop()
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    """Write the API's OpenAPI schema (no model is loaded)."""
    import json

    from .api import ServiceSettings, create_app
    from .atomic import atomic_write_bytes

    schema = create_app(ServiceSettings()).openapi()
    text = json.dumps(schema, indent=1, sort_keys=True) + "\n"
    if args.output is None:
        print(text, end="")
    else:
        atomic_write_bytes(args.output, text.encode("utf-8"))
    return 0
