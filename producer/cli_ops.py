"""Operations commands (`easel api`, `easel api-key`, `easel workers`, `easel batch`) registered onto the main CLI."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from easel.producer.extras import require


def api(host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 in a container)."),
        port: int = typer.Option(8000),
        workers: int = typer.Option(1, help="uvicorn worker processes (each runs a webhook dispatcher)."),
        webhooks: bool = typer.Option(True, help="Run the webhook dispatcher in this process."),
        log_level: str = typer.Option("info")) -> None:
    """Serve the HTTP API (OpenAPI at /docs and /openapi.json, metrics at /metrics)."""
    require("api", "api")
    import logging
    import logging.config
    import os

    import uvicorn
    import yaml

    from easel.producer.api.metrics import multiprocess_metrics
    from easel.producer.api.security import KeyRing
    from easel.shared.logs import uvicorn_log_config
    from easel.shared.settings import get_settings

    # uvicorn's lines and easel's in one format (EASEL_LOG_FORMAT), in this process too.
    log_config = uvicorn_log_config(log_level, get_settings().log_format)
    logging.config.dictConfig(log_config)
    try:
        keys = KeyRing(get_settings())
    except (OSError, ValueError, yaml.YAMLError) as e:  # a server must not start on keys it cannot trust
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] API keys: {escape(str(e))}")
        raise typer.Exit(2) from None
    if not len(keys):
        logging.getLogger("easel.producer.api").warning(
            "no API keys configured (EASEL_API_KEYS / EASEL_API_KEYS_FILE): every /v1 request will get 401; "
            "make one with `easel api-key NAME`")
    os.environ["EASEL_API_WEBHOOKS"] = "1" if webhooks else "0"
    # With several workers /metrics sums every server process's counts (PROMETHEUS_MULTIPROC_DIR).
    with multiprocess_metrics(workers):
        uvicorn.run("easel.producer.cli_ops:_app_factory", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, log_config=log_config, proxy_headers=True, timeout_graceful_shutdown=10)


def api_key(name: str = typer.Argument(..., help="Owner name for the key (letters, digits, . _ -)."),
            token: Optional[str] = typer.Option(None, help="Hash this token instead of making a new one.")) -> None:
    """Make an API key: prints the token (give it to the client) and the config entry (only its hash)."""
    import json
    import secrets

    from pydantic import ValidationError

    from easel.producer.api.security import hash_key
    from easel.shared.settings import ApiKey

    tok = token or f"easel_{secrets.token_urlsafe(32)}"
    try:
        entry = ApiKey(name=name, sha256=hash_key(tok))
    except ValidationError:
        Console(stderr=True, soft_wrap=True).print(
            f"[red]error:[/red] key name {escape(repr(name))}: 1 to 64 letters, digits, '.', '_' or '-'")
        raise typer.Exit(2) from None
    print(f"token:  {tok}")
    print(f"config: {json.dumps(entry.model_dump(include={'name', 'sha256'}))}")


def workers() -> None:
    """Live worker processes (tab-separated): family, device, peak memory (MiB: torch's peak
    allocation on a GPU, peak resident set on the CPU), warm-up compile seconds, hostname, and
    the family's models it could not load (its log says why; their jobs try again)."""
    from easel.producer.client import EaselClient
    from easel.shared.settings import get_settings

    print("family\tdevice\tpeak_mib\tcompile_s\thostname\tmodels_failed")
    rows = EaselClient(get_settings()).store.presences()
    for w in sorted(rows, key=lambda w: (w.get("family", ""), w.get("hostname", ""))):
        peak = w.get("peak_memory_bytes")
        mib = "-" if peak is None else f"{peak / 2**20:.0f}"
        compile_s = sum((w.get("compile_s") or {}).values())
        failed = ",".join(sorted(w.get("models_failed") or {})) or "-"
        print(f"{w.get('family')}\t{w.get('device')}\t{mib}\t{compile_s:.1f}\t{w.get('hostname')}\t{failed}")


def batch(manifest: Path = typer.Argument(..., help="Jobs, one per row: .jsonl (job objects or flat rows) or .csv."),
          out: Path = typer.Option(Path("easel-batch"), "--out", "-o", help="Results tree, state and summary."),
          concurrency: int = typer.Option(8, help="Parallel submissions and downloads."),
          timeout: Optional[float] = typer.Option(None, help="Give up waiting after this many seconds."),
          download: bool = typer.Option(True, help="Download results into OUT/<row name>/."),
          retry_failed: bool = typer.Option(False, help="Resubmit rows that failed in an earlier run."),
          model: str = typer.Option("sd15", help="Default model for flat rows without one."),
          cancel: bool = typer.Option(False, "--cancel", help=(
              "Cancel the jobs earlier runs into OUT submitted that have not ended, instead of running."))) -> None:
    """Submit every row, follow them with a progress bar, download results, write a summary.

    Resumable: rerunning skips rows already done (each row's idempotency key is recorded in
    OUT/.easel-batch-state.jsonl, and the queue itself maps a key to its first job). With
    --cancel (the same MANIFEST, OUT and --model), the batch's unfinished jobs are cancelled
    instead: a rerun then skips those rows, or submits them again with --retry-failed."""

    from easel.producer.batch import BatchError, cancel_batch, run_batch

    try:
        if cancel:
            done = cancel_batch(manifest, out, concurrency=concurrency, default_model=model)
        else:
            summary = run_batch(manifest, out, concurrency=concurrency, timeout=timeout, download=download,
                                retry_failed=retry_failed, default_model=model, console=Console(stderr=True))
    except BatchError as e:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:  # 130, as a shell reports Ctrl-C (a run writes its summary first)
        raise typer.Exit(130) from None
    if cancel:
        print(f"cancelled {done.cancelled}; stopping at their next step {done.stopping}; ended before {done.ended}")
        return
    raise typer.Exit(0 if summary.succeeded == summary.total else 1)


def register(app: typer.Typer) -> None:
    """Attach the operations commands to ``app``."""
    app.command()(api)
    app.command("api-key")(api_key)
    app.command()(workers)
    app.command()(batch)


def _app_factory():
    """uvicorn's factory: settings come from the environment of each worker process."""
    import os

    from easel.producer.api import create_app

    return create_app(webhooks=os.environ.get("EASEL_API_WEBHOOKS", "1") == "1")
