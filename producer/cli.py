"""The `easel` command line."""
from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from easel.producer.extras import require
from easel.shared.logs import quiet_libraries

quiet_libraries()

app = typer.Typer(help="easel: diffusers image-to-image jobs through Redis, GPU workers and S3.",
                  no_args_is_help=True, add_completion=False)
models_app = typer.Typer(help="Model registry and tiny checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")
queues_app = typer.Typer(help="Family queues: with no command, each queue's messages in the broker, jobs pending "
                                "their tenant's turn, live workers, their recent seconds per job and whether it is "
                                "paused (tab-separated); or pause and resume one.")
app.add_typer(queues_app, name="queues")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # an error is one line, whatever the width


def _client():
    from easel.producer.client import EaselClient

    return EaselClient()


TIMED_OUT = 124  # as timeout(1) exits
UNREACHABLE = 3  # Redis or the object store out of reach
INTERRUPTED = 130


def _fail(msg: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {escape(msg)}", highlight=False)  # msg may hold a user's [brackets]
    raise typer.Exit(code)


def _registry():
    """The registry in force; one that cannot be read or is invalid says why, in plain words."""
    import yaml
    from pydantic import ValidationError

    from easel.shared.registry import load_registry
    from easel.shared.settings import get_settings

    path = get_settings().models
    try:
        return load_registry(path)
    except (ValidationError, yaml.YAMLError, OSError) as e:
        _fail(f"model registry {path}: {e}")


@app.command()
def demo(out: Path = typer.Option(Path("easel-out"), help="Where results are written."),
         steps: int = typer.Option(10, help="Denoising steps per stage."),
         size: int = typer.Option(256, help="Input image side in pixels.")) -> None:
    """Run the main job on embedded defaults: servers, tiny checkpoints, a worker, jobs, results."""
    require("demo", "worker", "dev")
    from easel.producer.demo import run_demo

    sys.exit(run_demo(out, steps=steps, size=size, console=console))


@app.command()
def dev(data: Path = typer.Option(Path(".easel/dev"), "--data", help="Folder the servers keep their data in, across runs."),
        redis_port: int = typer.Option(6390, help="valkey (Redis) port."),
        s3_port: int = typer.Option(8390, help="S3 port; SeaweedFS also takes the next three and each of the four + 10000."),
        env_file: Optional[Path] = typer.Option(None, help="Write the export lines here (default DATA/env); "
                                                "removed on stop."),
        bucket: str = typer.Option("easel", help="Bucket to create and export as EASEL_S3_BUCKET.")) -> None:
    """Keep an embedded valkey and SeaweedFS running for a dev loop (Ctrl-C stops them); prints the
    environment for `easel worker`, `easel submit` and `easel api` in other shells."""
    require("dev", "dev")
    from easel.producer.dev import run_dev

    sys.exit(run_dev(data, redis_port=redis_port, s3_port=s3_port, env_file=env_file, bucket=bucket, console=console))


@app.command()
def worker(family: str = typer.Option(..., help="Model family (queue) this pool serves."),
           gpus: Optional[str] = typer.Option(None, help="Comma-separated GPU ids; one process each. Default: all, or CPU."),
           restart: bool = typer.Option(True, help="Restart a worker process that dies.")) -> None:
    """Start one Celery worker process per GPU for a family."""
    require("worker", "worker")
    from easel.shared.settings import get_settings
    from easel.worker.launcher import run_workers

    if get_settings().models is None:  # never serve random weights by accident
        _fail("no model registry: set EASEL_MODELS to your registry YAML "
              "(EASEL_MODELS=tiny serves the bundled tiny random-weight checkpoints, as the demo does)")
    try:
        _registry().family_models(family)
    except KeyError as e:
        _fail(str(e.args[0]))
    ids = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
    import os

    from easel.shared.logs import configure_logging

    configure_logging(os.environ.get("EASEL_LOGLEVEL", "INFO"), get_settings().log_format)  # the launcher's own lines
    raise typer.Exit(run_workers(family, ids, restart=restart))


def _load_job_file(path: Path) -> dict:
    import yaml

    text = path.read_text()
    return yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)


@app.command()
def submit(image: Optional[str] = typer.Option(None, "--image", "-i", help="Input: local path, s3://, https:// or data: URI."),
           prompt: str = typer.Option("", "--prompt", "-p"),
           model: str = typer.Option("sd15", "--model", "-m"),
           negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", "-n"),
           strength: float = typer.Option(0.8), guidance_scale: float = typer.Option(7.5),
           steps: int = typer.Option(30), seed: Optional[int] = typer.Option(None),
           num_images: int = typer.Option(1), fmt: str = typer.Option("png", "--format"),
           priority: Optional[int] = typer.Option(None, help="0 runs first, 9 last [default: 5, or the job file's]"),
           idempotency_key: Optional[str] = typer.Option(None, help="The same key again returns the first job's id."),
           tenant: Optional[str] = typer.Option(None, help=(
               "Whose fair share the job runs in [default: 'default', or the job file's]: an interactive job "
               "under a tenant of its own does not wait behind a bulk run's backlog.")),
           compel: bool = typer.Option(False, help="Read the prompt as Compel weighting syntax."),
           job: Optional[Path] = typer.Option(None, "--job", help=(
               "A JSON or YAML job file, used instead of the other flags but --priority, --idempotency-key and "
               "--tenant, "
               "which apply on top of it; local image paths in it are relative to the current directory.")),
           wait: bool = typer.Option(False, "--wait", help="Follow the job until it ends.")) -> None:
    """Submit a one-stage img2img job from flags, or any job from --job FILE. Prints the job id."""
    from easel.producer.client import SubmitError

    if job is not None:
        if not job.is_file():
            _fail(f"no such job file {job}")
        try:
            spec = _load_job_file(job)
        except Exception as e:
            _fail(f"cannot read {job}: {e}")
    else:
        if image is None:
            _fail("give --image (or --job FILE)")
        spec = {"input": {"image": image}, "num_images": num_images, "output": {"format": fmt},
                "stages": [{"task": "img2img", "model": model, "prompt": prompt, "negative_prompt": negative_prompt,
                            "strength": strength, "guidance_scale": guidance_scale, "steps": steps, "seed": seed,
                            "prompt_syntax": "compel" if compel else "plain"}]}
    if isinstance(spec, dict):  # a file holding something else is refused by the schema, below
        spec |= {k: v for k, v in {"priority": priority, "idempotency_key": idempotency_key,
                                   "tenant": tenant}.items() if v is not None}
    client = _client()
    try:
        job_id = client.submit(spec)
    except SubmitError as e:
        _fail(str(e))
    print(job_id)
    if wait:
        _wait(client, job_id, None)


def _wait(client, job_id: str, timeout: Optional[float]) -> None:
    from easel.producer.progress import follow, waiting_for

    try:
        st = follow(client, [job_id], timeout=timeout, console=err)[job_id]
    except KeyboardInterrupt:  # 130, as a shell reports Ctrl-C; 1 means the job failed
        _fail(f"stopped following; the job goes on (easel wait {job_id} to follow it again)", INTERRUPTED)
    except TimeoutError as e:
        why = waiting_for(client, job_id)
        _fail(f"{e}{f' ({why})' if why else ''}; it goes on (easel wait {job_id} to follow it again)", TIMED_OUT)
    except KeyError:
        _fail(f"no job {job_id} (its record expired)", 1)
    console.print_json(st.model_dump_json())
    if st.state.value != "succeeded":
        raise typer.Exit(1)


@app.command()
def status(job_id: str) -> None:
    """Print a job's status as JSON."""
    try:
        console.print_json(_client().status(job_id).model_dump_json())
    except KeyError:
        _fail(f"no job {job_id}", 1)


@app.command()
def wait(job_id: str, timeout: Optional[float] = typer.Option(
        None, help="Give up after this many seconds (exit 124); the job goes on.")) -> None:
    """Follow a job with a progress bar until it ends; exit 1 unless it succeeded (124 when
    --timeout ran out first)."""
    import redis

    client = _client()
    if timeout is None:  # rides out a Redis restart, then says it cannot reach Redis (exit 3)
        known = client.store.exists(job_id)
    else:
        try:  # a quick read: while Redis is away, following waits for it within --timeout
            known = client.follow_store().exists(job_id)
        except (redis.AuthenticationError, redis.ResponseError):  # no wait mends a password or an ACL
            raise
        except redis.RedisError:
            known = True
    if not known:
        _fail(f"no job {job_id}", 1)
    _wait(client, job_id, timeout)


@app.command()
def cancel(job_ids: list[str] = typer.Argument(..., metavar="job_id")) -> None:
    """Cancel jobs: a queued one at once, a running one within one denoising step. Prints each
    one's state (after its id, where several are named); exit 1 when one had already ended
    otherwise or does not exist, once all were tried."""
    from easel.shared.schema import JobState

    client, several, problems = _client(), len(job_ids) > 1, []
    for job_id in job_ids:
        try:
            now = client.cancel(job_id)
        except KeyError:
            state, problem = "unknown", f"no job {job_id}"
        else:
            state = now.value
            ended_otherwise = now.terminal and now is not JobState.cancelled
            problem = f"job {job_id} had already {state}; nothing to cancel" if ended_otherwise else None
        if several or state != "unknown":  # one unknown id: the error says it
            print(f"{job_id}\t{state}" if several else state)
        if problem:
            problems.append(problem)
    for problem in problems:
        err.print(f"[red]error:[/red] {escape(problem)}", highlight=False)
    if problems:
        raise typer.Exit(1)


@app.command()
def fetch(job_id: str, out: Path = typer.Option(Path("easel-out"), "--out", "-o")) -> None:
    """Download a finished job's images and manifest into OUT/<job_id>/."""
    import botocore.exceptions

    from easel.shared.storage import NotFound

    try:
        for p in _client().fetch(job_id, out):
            print(p)
    except NotFound as e:  # the job exists; one of its objects is gone (retention, a manual delete)
        missing = str(e).strip("'\"")
        _fail(f"job {job_id}: {missing}", 1)
    except KeyError:
        _fail(f"no job {job_id}", 1)
    except RuntimeError as e:
        _fail(str(e), 1)
    except OSError as e:  # OUT not writable, the disk full (botocore's timeouts are OSErrors too)
        if isinstance(e, botocore.exceptions.BotoCoreError):
            raise
        _fail(f"cannot write to {out}: {e.strerror or e}", 1)


@queues_app.callback(invoke_without_command=True)
def queues(ctx: typer.Context) -> None:
    """Per family queue: messages in the broker, jobs pending their tenant's turn, live workers,
    their recent seconds per job, and whether it is paused (tab-separated)."""
    if ctx.invoked_subcommand:
        return
    rows = _client().queues()
    print("queue\tmessages\tpending\tworkers\tjob_s\tstate")
    for q in rows:
        job_s = "-" if q.job_s is None else f"{q.job_s:.2f}"
        print(f"{q.queue}\t{q.messages}\t{q.pending}\t{q.live_workers}\t{job_s}\t{'paused' if q.paused else 'open'}")


@queues_app.command("pause")
def queues_pause(family: str) -> None:
    """Stop dispatching a family's pending jobs (they keep their order); running ones finish."""
    _queue_control(family, "pause")


@queues_app.command("resume")
def queues_resume(family: str) -> None:
    """Dispatch a paused family's pending jobs again, in their order."""
    _queue_control(family, "resume")


def _queue_control(family: str, action: str) -> None:
    try:
        getattr(_client(), action)(family)
    except KeyError as e:
        _fail(str(e).strip("'\""))
    print(f"{family}: {action}d")


@app.command()
def drain(hostname: str = typer.Argument(..., help="The worker process's hostname (easel workers lists them)."),
          force: bool = typer.Option(False, "--force", help="Ask even if no live worker has that hostname now "
                                                             "(one that starts under it within a day drains).")
          ) -> None:
    """Ask a worker process to finish its running stage and exit, for maintenance; its launcher
    leaves it stopped. Start it again to resume."""
    client = _client()
    live = sorted(p.get("hostname", "") for p in client.store.presences())
    if hostname not in live and not force:
        _fail(f"no live worker is called {hostname!r} (live: {', '.join(live) or 'none'}); --force asks anyway")
    client.drain(hostname)
    print(f"{hostname}: drain asked; it exits after its running stage (within one heartbeat)")


@models_app.command("make-tiny")
def make_tiny(out: Path = typer.Argument(..., help="Folder to write checkpoints into."),
              name: list[str] = typer.Option(None, "--name", help="Only these (default: all).")) -> None:
    """Write tiny random-weight diffusers checkpoints (safetensors) for tests, demo and benchmarks."""
    require("models make-tiny", "worker")
    from easel.worker.tiny import make_tiny_checkpoints

    for n, p in make_tiny_checkpoints(out, name or None).items():
        print(f"{n}\t{p}")


@models_app.command("list")
def models_list() -> None:
    """The registry in force (EASEL_MODELS, else the bundled tiny one), checked against the
    registry's schema (weights are not loaded)."""
    for name, m in sorted(_registry().models.items()):
        print(f"{name}\tfamily={m.family}\tkind={m.kind}\tlatent={m.latent_space}\tsource={m.source}")


from easel.producer.cli_ops import register as _register_ops  # noqa: E402

_register_ops(app)


def _unwrap_help(typer_app: typer.Typer) -> None:
    """Docstrings are wrapped for the source, and typer's help keeps their line breaks, which
    would land mid-sentence at any terminal width: each paragraph becomes one line."""
    for info in typer_app.registered_commands:
        text = info.help or inspect.getdoc(info.callback)
        if text:
            info.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in text.split("\n\n"))
    for group in typer_app.registered_groups:
        _unwrap_help(group.typer_instance)


_unwrap_help(app)


def main() -> None:
    """The `easel` command: Redis or the object store out of reach or failing is one line and exit 3, a
    bad EASEL_* setting a line per variable and exit 2, not a traceback."""
    import botocore.exceptions
    import kombu.exceptions
    import redis
    from kombu.utils.url import maybe_sanitize_url
    from pydantic import ValidationError

    from easel.shared.settings import get_settings

    try:
        app()
    except (redis.ConnectionError, redis.TimeoutError) as e:
        where = maybe_sanitize_url(get_settings().redis_url)  # the password masked
        err.print(f"[red]error:[/red] cannot reach Redis at {escape(where)} (EASEL_REDIS_URL): {escape(str(e))}",
                  highlight=False)
        sys.exit(UNREACHABLE)
    except (redis.RedisError, kombu.exceptions.OperationalError) as e:  # READONLY, OOM, LOADING: a failover
        where = maybe_sanitize_url(get_settings().redis_url)
        err.print(f"[red]error:[/red] Redis at {escape(where)} (EASEL_REDIS_URL) failed the command: "
                  f"{type(e).__name__}: {escape(str(e))}", highlight=False)
        sys.exit(UNREACHABLE)
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as e:
        where = get_settings().s3_endpoint_url or "AWS S3"
        err.print(f"[red]error:[/red] object storage at {escape(where)} (EASEL_S3_*): {type(e).__name__}: "
                  f"{escape(str(e))}",
                  highlight=False)
        sys.exit(UNREACHABLE)
    except ValidationError as e:
        if e.title != "Settings":
            raise
        for name, why in _settings_problems(e).items():
            err.print(f"[red]error:[/red] {escape(name)}: {escape(why)}", highlight=False)
        sys.exit(2)


_UNSHOWN = re.compile(r"secret|key|token|password|url|credential", re.IGNORECASE)  # values never echoed


def _settings_problems(e) -> dict[str, str]:
    """Settings' validation errors by the variable that sets each field, with the value given
    unless it may hold a secret (a field that may be one of several types fails each: they
    are joined with "or")."""
    out: dict[str, list[str]] = {}
    for problem in e.errors(include_url=False):
        name = "settings"
        if problem["loc"]:
            field = str(problem["loc"][0])
            name = f"EASEL_{field.upper()}"
            if not _UNSHOWN.search(field) and not isinstance(problem.get("input"), dict):
                name += f"={problem.get('input')!r}"
        out.setdefault(name, []).append(problem["msg"].removeprefix("Value error, "))
    return {name: " or ".join(dict.fromkeys(whys)) for name, whys in out.items()}


if __name__ == "__main__":
    main()
