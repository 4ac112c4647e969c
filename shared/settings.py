"""Settings from ``EASEL_*`` environment variables, one object shared by producer and worker."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EASEL_", extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "easel"
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    models: Path | None = Field(default=None, description="Model registry YAML; the bundled tiny registry if unset.")
    model_root: Path = Field(default=Path.home() / ".cache" / "easel" / "models",
                             description="Folder that relative registry sources resolve against.")
    queue_prefix: str = "easel"
    # Limits on inputs.
    max_image_pixels: int = 4096 * 4096
    max_input_bytes: int = 50 * 1024 * 1024
    max_prompt_chars: int = 4000
    max_steps: int = 500
    max_side: int = 4096
    allow_private_urls: bool = False
    # Worker behaviour.
    visibility_timeout_s: int = 3600
    job_ttl_s: int = 7 * 24 * 3600
    device: str | None = None  # "cuda", "cpu"; auto when unset

    def s3_credentials(self) -> dict[str, str]:
        if self.s3_access_key_id and self.s3_secret_access_key:
            return {
                "aws_access_key_id": self.s3_access_key_id,
                "aws_secret_access_key": self.s3_secret_access_key.get_secret_value(),
            }
        return {}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
