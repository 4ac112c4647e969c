"""The easel HTTP API (FastAPI): ``easel api`` serves ``create_app()`` with uvicorn."""
from easel.producer.api.app import create_app

__all__ = ["create_app"]
