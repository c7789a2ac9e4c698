"""The HTTP service: ``create_app`` (FastAPI), ``Service`` (its state), ``ServiceSettings``."""

from .app import build_service, create_app
from .errors import ServiceError
from .service import Service
from .settings import ServiceSettings, SettingsError

__all__ = ["create_app", "build_service", "Service", "ServiceSettings", "SettingsError", "ServiceError"]
