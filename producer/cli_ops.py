"""Operations commands (`easel api`, `easel batch`) registered onto the main CLI."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Attach the operations commands to ``app``."""
