"""The FastAPI application: ``create_app(settings)``.

Nothing heavy happens at import or in ``create_app``: the lifespan builds the ``Service``
(model, cache, scheduler, volume store, decoders) on startup, in a worker thread, and
closes it on shutdown (queued jobs cancelled, the running one stopped at its next
slice, the encoder's current batch finished). Errors become ``{"detail": ...}`` with a
real status code; an unexpected exception is logged and answered with a 500 that
carries no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Sequence

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import __version__
from .errors import ServiceError
from .routers import ROUTERS
from .schemas import complete_openapi
from .security import TokenMiddleware
from .service import Service
from .settings import ServiceSettings

log = logging.getLogger(__name__)

__all__ = ["create_app", "build_service"]

DESCRIPTION = """DeSAM segmentation service for SlicerDeSAM: upload a volume once, then
segment slices from prompts (SAM's decoder, answered from cached encoder features) or
automatically (DeSAM's whole-box / grid-points modes, as jobs). Volumes and masks travel
in the binary wire format of docs/WIRE_FORMAT.md; everything else is JSON."""


def build_service(settings: ServiceSettings) -> Service:
    """Load the model the settings name and start the service around it."""
    from ..engine.runtime import configure_malloc
    from ..loading import build_model

    configure_malloc()
    model, info = build_model(settings.encoder, settings.sam_checkpoint, None, settings.device)
    return Service(settings, model, model_info=info)


def _in_own_thread(fn, *args):
    """``fn(*args)`` on a thread that ends afterwards: model loading runs parallel PyTorch
    work, and the OpenMP team that leaves behind lives as long as its thread (a pooled
    one would keep it, see ``engine.scheduler_worker``)."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc

    thread = threading.Thread(target=run, name="desam-startup")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def create_app(settings: ServiceSettings | None = None,
               service_factory: Callable[[ServiceSettings], Service] | None = None,
               routers: Sequence[APIRouter] = ROUTERS) -> FastAPI:
    """``service_factory`` (default ``build_service``) runs in the lifespan; tests pass
    one that builds a small model. ``routers``: the API's routers (a cluster replica,
    ``desam_server.cluster``, passes them with its own jobs router, which also answers for
    jobs of other replicas)."""
    settings = settings or ServiceSettings.load()
    factory = service_factory or build_service

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service = await anyio.to_thread.run_sync(_in_own_thread, factory, settings)
        app.state.service = service
        log.info("service ready: encoder %s on %s, %d decoder(s)", service.model.encoder_name,
                 service.model.device, len(service.decoders.names()))
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(service.close)

    app = ServiceApp(title="SlicerDeSAM service", version=__version__, description=DESCRIPTION, lifespan=lifespan)
    app.state.service = None
    app.state.settings = settings
    app.state.replica = None          # a cluster replica's identity (desam_server.cluster), shown by /info
    for router in routers:
        app.include_router(router)
    _add_handlers(app)
    # The last added middleware runs first: CORS before the token check, so that a browser's
    # preflight (an OPTIONS that carries no token) from an allowed origin gets its CORS answer,
    # and a 401 to an allowed origin carries the CORS headers the browser needs to show it.
    if settings.token:
        app.add_middleware(TokenMiddleware, token=settings.token)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


class ServiceApp(FastAPI):
    """FastAPI whose OpenAPI schema also has the links between operations and the limits of
    the app's settings (``schemas.complete_openapi``)."""

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            complete_openapi(super().openapi(), max_points=self.state.settings.max_points)
        return self.openapi_schema


def _allowed_methods(request: Request) -> str:
    """Every method the request's path supports, across all routes on that path."""
    methods = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _add_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's 405 names only the methods of the first route on the path (POST /volumes
        # answered "Allow: POST" though GET /volumes exists); RFC 9110 asks for all of them.
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": _allowed_methods(request)}
        return await http_exception_handler(request, exc)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                    for e in exc.errors()]
        malformed = any(p["type"] in ("json_invalid", "model_attributes_type") and len(p["loc"]) <= 2
                        for p in problems)
        return JSONResponse({"detail": problems}, status_code=400 if malformed else 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected %s in %s %s", exc.__class__.__name__, request.method, request.url.path,
                  exc_info=exc)
        return JSONResponse({"detail": "internal error; the service log has the details"}, status_code=500)
