"""The OpenAPI document: FastAPI's, plus what only this server knows.

The job schema (shared/schema.py) stays registry-agnostic for the Python client and the CLI;
the document published here narrows it to this server's registry (model and ControlNet names
as enums) and its image reference forms, and lists the error body every error status uses.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from easel.producer.api.models import FieldError, ProgressEvent, Problem, StateEvent
from easel.producer.api.state import ApiState

_EXTRA_MODELS = (Problem, FieldError, ProgressEvent, StateEvent)


def _nullable_string(schema: dict[str, Any]) -> dict[str, Any]:
    """The string branch of an ``X | None`` property (``anyOf: [string, null]``), or the schema."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") == "string":
            return branch
    return schema


def _narrow_job_schema(schemas: dict[str, Any], api: ApiState) -> None:
    stage = schemas["Stage"]["properties"]
    stage["model"]["enum"] = api.model_names
    stage["model"]["description"] = "a model this server's registry names"
    controlnets = api.controlnet_names
    if controlnets:
        _nullable_string(stage["controlnet"])["enum"] = controlnets
    else:
        stage["controlnet"] = {"type": "null", "description": "no ControlNets are registered on this server"}
    # A prefix each accepted reference starts with (bucket and key for s3://); plain http:// only
    # where private URLs are allowed, as the submission check refuses it otherwise.
    prefixes = [r"s3://[^/]+/[^/]", "https://", "data:image/"] + (["http://"] if api.s.allow_private_urls else [])
    pattern = "^(" + "|".join(prefixes) + ")"
    for ref in (stage["control_image"], schemas["JobInput"]["properties"]["image"]):
        _nullable_string(ref)["pattern"] = pattern


def _add_models(schemas: dict[str, Any]) -> None:
    _, top = models_json_schema([(m, "serialization") for m in _EXTRA_MODELS],
                                ref_template="#/components/schemas/{model}")
    for name, schema in top.get("$defs", {}).items():
        schemas.setdefault(name, schema)
    # Every error documents Problem: FastAPI's validation-error schemas describe nothing sent.
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)


def build_openapi(app: FastAPI, api: ApiState) -> dict[str, Any]:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes,
                          tags=app.openapi_tags)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        _add_models(schemas)
        _narrow_job_schema(schemas, api)
        app.openapi_schema = doc
    return app.openapi_schema


def install(app: FastAPI, api: ApiState) -> None:
    app.openapi = lambda: build_openapi(app, api)  # type: ignore[method-assign]
