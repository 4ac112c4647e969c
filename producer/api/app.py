"""The HTTP API: submit, follow (SSE), cancel and fetch jobs; uploads; health; metrics.

A thin layer over ``EaselClient``: the same validation, planning and queueing as the CLI,
plus what a shared network service needs: bearer keys (stored as sha256), per-key rate
limits and in-flight caps kept in Redis (shared by every replica), per-key job
visibility, presigned result URLs and signed webhooks. Routes live in jobs.py, events.py,
uploads.py and operations.py; what they share is an ``ApiState`` on ``app.state.api``.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from easel.producer.api import errors, events, jobs, openapi, operations, uploads
from easel.producer.api.limits import BodyLimit
from easel.producer.api.metrics import MetricsMiddleware
from easel.producer.api.state import ApiState
from easel.shared.settings import Settings, get_settings

DESCRIPTION = ("Diffusers image-to-image jobs: submit, follow (SSE), cancel, fetch. "
               "Authenticate with `Authorization: Bearer <API key>`. Every error answers with the same "
               "JSON body (`Problem`): `detail` says what went wrong.")


def create_app(settings: Settings | None = None, *, webhooks: bool = True) -> FastAPI:
    """The ASGI app. ``webhooks=False`` runs no dispatcher in this process (run one elsewhere)."""
    api = ApiState(settings or get_settings())

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        api.start(webhooks)
        try:
            yield
        finally:
            await api.stop()

    app = FastAPI(title="easel", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    app.state.api = api
    app.add_middleware(BodyLimit, api=api)  # inside the metrics: refusals are counted
    app.add_middleware(MetricsMiddleware, metrics=api.metrics)
    errors.install(app)
    for module in (jobs, events, uploads, operations):
        app.include_router(module.router)
    openapi.install(app, api)
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easel")
    except PackageNotFoundError:
        return "dev"
