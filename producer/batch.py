"""``easel batch``: thousands of jobs from a JSONL or CSV manifest, resumable, results on disk.

Each row gets an idempotency key (its own, or one derived from its content), so a rerun
after a crash or Ctrl-C submits nothing twice: the queue maps a key to its first job, and
``OUT/.easel-batch-state.jsonl`` (appended as rows finish) lets a rerun skip finished rows
without touching Redis at all. Results land in ``OUT/<row name>/`` with the job manifest;
``OUT/summary.json`` has the counts, every failure with its reason, and the throughput.

Row formats:
- JSONL, a full job per line (``{"input": ..., "stages": [...]}``), optionally with ``name``;
- JSONL or CSV flat rows: ``image, prompt, model, strength, steps, guidance_scale, seed,
  negative_prompt, num_images, format, priority, idempotency_key, tenant, name`` (empty cells are
  omitted). Relative image paths resolve against the manifest's folder.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import redis
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

STATE_FILE = ".easel-batch-state.jsonl"
SUMMARY_FILE = "summary.json"
STAGE_FIELDS = {"task", "model", "prompt", "negative_prompt", "prompt_syntax", "strength", "guidance_scale", "steps",
                "seed", "width", "height", "control_image", "controlnet", "controlnet_conditioning_scale",
                "noise_level"}
JOB_FIELDS = {"priority", "num_images", "idempotency_key", "tenant"}
OTHER_FIELDS = {"image", "format", "quality", "name"}
TERMINAL = {"succeeded", "failed", "cancelled"}
LOST_REASON = "job record gone (expired or lost); a rerun submits it again"
NOT_DOWNLOADED = "finished, not downloaded in time; a rerun downloads it"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
POLLS_PER_S = 2000  # job states read a second at most while waiting: 10,000 jobs are read every 5 s


class BatchError(ValueError):
    """The manifest as a whole cannot be used (missing, unreadable, unknown format)."""


@dataclass
class Row:
    index: int  # 1-based data row number
    name: str
    key: str  # the row's identity in the state file; idempotency keys derive from it
    job: dict | None = None
    error: str | None = None
    legacy_key: str = ""  # its identity in a folder an earlier easel began (the row as written)
    derived: bool = True  # its key comes from its content (False: the row's own idempotency_key)


@dataclass
class Outcome:
    key: str
    name: str
    row: int
    state: str = "pending"  # pending | submitted | downloading | succeeded | failed | cancelled | refused | lost
    job_id: str | None = None
    attempt_key: str | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)
    images: int = 0


@dataclass
class Summary:
    manifest: str
    out: str
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0
    pending: int = 0
    submitted: int = 0
    elapsed_s: float = 0.0
    finished_this_run: int = 0
    images_this_run: int = 0
    jobs_per_min: float = 0.0
    images_per_s: float = 0.0
    failures: list[dict] = field(default_factory=list)


# -- reading the manifest ---------------------------------------------------------------------
def _is_ref(v: str) -> bool:
    return v.startswith(("s3://", "https://", "http://", "data:"))


def _resolve(v, base: Path):
    """A local path relative to the manifest's folder; anything else as it is."""
    if not (isinstance(v, str) and v and not _is_ref(v)):
        return v
    try:
        absolute = Path(v).expanduser().is_absolute()
    except RuntimeError:  # Path.expanduser: a ~user/ path of no such user
        raise ValueError(f"{v}: no such user's home folder") from None
    return v if absolute else str(base / v)


def _flat_to_job(row: dict, base: Path, default_model: str) -> dict:
    unknown = set(row) - STAGE_FIELDS - JOB_FIELDS - OTHER_FIELDS
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(sorted(unknown))}")
    stage = {k: v for k, v in row.items() if k in STAGE_FIELDS}
    stage.setdefault("model", default_model)
    stage.setdefault("task", "img2img")
    if "control_image" in stage:
        stage["control_image"] = _resolve(stage["control_image"], base)
    job: dict = {k: row[k] for k in JOB_FIELDS if k in row}
    job["stages"] = [stage]
    if row.get("image"):
        job["input"] = {"image": _resolve(row["image"], base)}
    out = {k: row[k] for k in ("format", "quality") if k in row}
    if out:
        job["output"] = out
    return job


def _full_job(row: dict, base: Path) -> dict:
    job = json.loads(json.dumps(row))
    if isinstance(job.get("input"), dict) and "image" in job["input"]:
        job["input"]["image"] = _resolve(job["input"]["image"], base)
    for st in _stages(job):
        if "control_image" in st:
            st["control_image"] = _resolve(st["control_image"], base)
    return job


def _stages(job: dict) -> list[dict]:
    """The job's stage objects, whatever the row holds (its validation says what is wrong)."""
    stages = job.get("stages")
    return [st for st in stages if isinstance(st, dict)] if isinstance(stages, list) else []


def _raw_rows(path: Path) -> list[tuple[dict | None, str | None]]:
    kind = path.suffix.lower()
    if kind not in (".csv", ".jsonl", ".ndjson", ".json"):
        raise BatchError(f"{path}: unknown manifest format (use .jsonl or .csv)")
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            return _csv_rows(fh) if kind == ".csv" else _jsonl_rows(fh)
    except UnicodeDecodeError as e:
        raise BatchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise BatchError(f"{path}: cannot read it: {e.strerror or e}") from None


def _csv_rows(fh) -> list[tuple[dict | None, str | None]]:
    """Rows as the csv module reads them (quoted fields may hold commas and newlines); a row
    with more fields than the header is refused, not cut short."""
    rows, reader = [], csv.DictReader(fh)
    for rec in reader:
        if rec.get(None):
            rows.append((None, f"line {reader.line_num}: {len(reader.fieldnames or []) + len(rec[None])} fields, "
                               f"the header has {len(reader.fieldnames or [])}; quote fields that hold commas"))
            continue
        rows.append(({k.strip(): v.strip() for k, v in rec.items() if k and v is not None and v.strip() != ""}, None))
    return rows


def _jsonl_rows(fh) -> list[tuple[dict | None, str | None]]:
    rows = []
    for lineno, line in enumerate(fh, 1):  # lines end at \n only: JSON strings may hold other breaks
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            obj = json.loads(line)
            rows.append((obj, None) if isinstance(obj, dict) else (None, f"line {lineno}: not a JSON object"))
        except json.JSONDecodeError as e:
            rows.append((None, f"line {lineno}: invalid JSON ({e.msg})"))
    return rows


def read_manifest(path: Path, default_model: str = "sd15") -> list[Row]:
    """Rows with their job dicts, names and idempotency keys; bad rows carry an error."""
    path = Path(path)
    if not path.is_file():
        raise BatchError(f"no such manifest {path}")
    base = path.resolve().parent
    rows: list[Row] = []
    seen_keys: dict[str, int] = {}
    names: set[str] = {SUMMARY_FILE, SUMMARY_FILE + ".part"}  # beside the rows' folders in OUT (and its temp)
    for i, (raw, err) in enumerate(_raw_rows(path), 1):
        raw = dict(raw or {})
        name = _SAFE.sub("_", str(raw.pop("name", "") or "")).strip("._")[:100] or f"row-{i:05d}"
        name = _unique(name, i, names)
        job = None
        if err is None:
            try:
                job = _full_job(raw, base) if "stages" in raw else _flat_to_job(raw, base, default_model)
            except ValueError as e:
                err = str(e)
        explicit = raw.get("idempotency_key")
        key = str(explicit or f"batch-{_identity(job if job is not None else raw)}")
        legacy = str(explicit or "batch-" + hashlib.sha256(json.dumps(raw, sort_keys=True, default=str).encode()
                                                          ).hexdigest()[:32])
        n = seen_keys.get(key, 0)
        seen_keys[key] = n + 1
        if n:  # identical rows are distinct jobs, each submitted once
            key, legacy = f"{key}-{n}", f"{legacy}-{n}"
        rows.append(Row(index=i, name=name, key=key, job=job, error=err, legacy_key=legacy, derived=not explicit))
    return rows


def _unique(name: str, index: int, taken: set[str]) -> str:
    """The row's results folder name, unique among the rows' (ignoring case, as macOS and
    Windows folders do): a repeat gets the row number, then a count, until it is new."""
    candidate, n = name, 0
    while candidate.casefold() in taken:
        n += 1
        candidate = f"{name}-{index:05d}" + (f"-{n}" if n > 1 else "")
    taken.add(candidate.casefold())
    return candidate


def _identity(job: dict) -> str:
    """A row's identity: the job it makes (defaults applied, paths resolved), with each local
    image's size and modification time, so a changed default, another folder's file of the
    same name or an edited image is a new job, and the same row reruns as the same job."""
    files = {}
    for ref in _local_refs(job):
        try:
            st = Path(ref).expanduser().stat()
            files[ref] = [st.st_size, st.st_mtime_ns]
        except (OSError, RuntimeError):  # RuntimeError: a ~user/ path of no such user
            files[ref] = None  # the submission says it is missing
    blob = json.dumps({"job": job, "files": files}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _local_refs(job: dict) -> list[str]:
    refs = [(job.get("input") or {}).get("image") if isinstance(job.get("input"), dict) else None]
    refs += [st.get("control_image") for st in _stages(job)]
    return [r for r in refs if isinstance(r, str) and r and not _is_ref(r)]


# -- state ------------------------------------------------------------------------------------
class StateFile:
    """Append-only JSON lines, last line per key wins; safe to kill at any point."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError):
                    continue  # a torn last line from a kill
        return out

    def write(self, o: Outcome) -> None:
        line = json.dumps({**asdict(o), "t": time.time()}) + "\n"
        with self._lock, open(self.path, "a") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


# -- running ----------------------------------------------------------------------------------
RUN_ID_FILE = ".easel-batch-id"


def _run_id(out: Path, began: bool) -> str | None:
    """The OUT folder's own prefix for derived idempotency keys, made on its first run and
    kept with its state: a rerun into the same folder resumes the same jobs. None for a
    folder an earlier easel began (a state file and no prefix): it resumes as it began."""
    path = out / RUN_ID_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        if began:
            return None
        run_id = f"b{os.urandom(6).hex()}"
        _write_whole(path, run_id)
        return run_id


def _write_whole(path: Path, text: str) -> None:
    from easel.producer.client import write_whole

    write_whole(path, text.encode())


def _download(client, o: Outcome, outputs: list[str], manifest: str | None, target: Path) -> list[str]:
    from easel.producer.client import write_whole

    target.mkdir(parents=True, exist_ok=True)
    files = []
    for uri in outputs + ([manifest] if manifest else []):
        dest = target / uri.rsplit("/", 1)[1]
        write_whole(dest, client.storage.get(uri))
        files.append(str(dest.relative_to(target.parent)))
    return files


def run_batch(manifest: Path, out: Path, *, client=None, concurrency: int = 8, timeout: float | None = None,
              download: bool = True, retry_failed: bool = False, default_model: str = "sd15",
              poll_s: float = 0.5, console: Console | None = None) -> Summary:
    from easel.producer.client import EaselClient

    console = console or Console(stderr=True)
    rows = read_manifest(manifest, default_model)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BatchError(f"cannot use {out} for the results: {e.strerror or e}") from None
    client = client or EaselClient()
    client.store.ping()  # Redis out of reach fails the run now (exit 3), not each row after its retries
    state = StateFile(out / STATE_FILE)
    prior = state.load()
    outcomes, todo, skipped = _plan(rows, prior, _run_id(out, began=bool(prior)), out, download, retry_failed)
    t0 = time.monotonic()
    run = _Run(client, state, outcomes, out, download, poll_s, concurrency)
    run.go(todo, console, timeout)
    summary = _summarise(Summary(manifest=str(manifest), out=str(out), total=len(rows), skipped=len(skipped),
                                 submitted=run.submitted, elapsed_s=round(time.monotonic() - t0, 3),
                                 finished_this_run=run.finished, images_this_run=run.images), outcomes)
    _write_whole(out / SUMMARY_FILE, json.dumps(asdict(summary), indent=2))
    _print_summary(console, summary)
    if run.interrupted:
        raise KeyboardInterrupt
    return summary


CANCELLED_REASON = "cancelled by easel batch --cancel"


@dataclass
class Cancelled:
    """What ``cancel_batch`` did, in jobs."""

    cancelled: int = 0  # ended now, recorded as cancelled
    stopping: int = 0  # running: they stop at their next denoising step (a rerun records them)
    ended: int = 0  # had ended before the cancel came (a rerun records them), or their records are gone


def cancel_batch(manifest: Path, out: Path, *, client=None, concurrency: int = 8,
                 default_model: str = "sd15") -> Cancelled:
    """Cancel every job that runs of this batch into ``out`` submitted and that has not
    ended: those the state file records as submitted, and those a run killed before it
    recorded them made under this folder's keys (found by the keys the rows would have had;
    a row's own ``idempotency_key`` is looked up only where recorded: it may name a job of
    any batch). The last submitted go first, so that the room a cancel frees in a queue is
    not taken by a job of this batch about to be cancelled. A rerun skips the cancelled rows
    (``--retry-failed`` submits them again)."""
    from easel.producer.client import EaselClient

    out = Path(out)
    state = StateFile(out / STATE_FILE)
    prior = state.load()
    if not prior and not (out / RUN_ID_FILE).exists():
        raise BatchError(f"no batch has run into {out}: nothing to cancel")
    client = client or EaselClient()
    client.store.ping()
    recorded = [Outcome(**{k: rec.get(k) for k in ("key", "name", "row", "job_id", "attempt_key")})
                for rec in prior.values() if rec.get("state") == "submitted" and rec.get("job_id")]
    targets = sorted(recorded + _unrecorded(client, manifest, out, prior, default_model), key=lambda o: -(o.row or 0))
    live = []
    for start in range(0, len(targets), 500):  # one that has ended is left as it ended
        part = targets[start:start + 500]
        live += [o for o, (st, *_) in zip(part, client.store.outcomes_of([o.job_id for o in part]))
                 if st is not None and st not in TERMINAL]
    done = Cancelled(ended=len(targets) - len(live))
    targets = live
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="easel-cancel") as pool:
        for o, now in zip(targets, pool.map(lambda o: _cancel_job(client, o.job_id), targets)):
            if now == "cancelled":
                o.state, o.error = "cancelled", CANCELLED_REASON
                state.write(o)
                done.cancelled += 1
            elif now == "running":
                done.stopping += 1
            else:
                done.ended += 1
    return done


def _unrecorded(client, manifest: Path, out: Path, prior: dict[str, dict], default_model: str) -> list[Outcome]:
    """Rows whose next submission (a resumed run's, or a ``--retry-failed`` run's) has a job
    under this folder's key that the state file does not record."""
    run_id = _run_id(out, began=True)
    if run_id is None:  # a folder an earlier easel began: its keys are not this folder's alone
        return []
    rows = read_manifest(manifest, default_model)  # the model the run had: flat rows' keys depend on it
    outcomes, todo, _ = _plan(rows, prior, run_id, out, download=False, retry_failed=True)
    ask = [outcomes[row.key] for row in todo if row.derived and not outcomes[row.key].job_id]
    found = []
    for start in range(0, len(ask), 1000):
        part = ask[start:start + 1000]
        for o, job_id in zip(part, client.store.idempotent_jobs([o.attempt_key for o in part])):
            if job_id:
                o.job_id = job_id
                found.append(o)
    return found


def _cancel_job(client, job_id: str) -> str | None:
    """The job's state after its cancel; None when its record is gone."""
    try:
        return client.cancel(job_id).value
    except KeyError:
        return None


_ENDED_BADLY = ("failed", "cancelled", "refused")


def _plan(rows: list[Row], prior: dict[str, dict], run_id: str | None, out: Path, download: bool,
          retry_failed: bool) -> tuple[dict[str, Outcome], list[Row], set[str]]:
    """Each row's outcome so far and its idempotency key for this run; (outcomes by key, rows
    to submit or follow, keys of rows that ended in an earlier run and stay as they are)."""
    outcomes: dict[str, Outcome] = {}
    todo: list[Row] = []
    skipped: set[str] = set()
    if run_id is None:  # a folder an earlier easel began: its rows keep the keys they had
        for row in rows:
            row.key = row.legacy_key
    _keep_folders(rows, prior)
    for row in rows:
        # A derived key is this OUT folder's: another folder (or this one emptied) starts over.
        first_key = f"{run_id}-{row.key}" if row.derived and run_id is not None else row.key
        o = outcomes[row.key] = Outcome(key=row.key, name=row.name, row=row.index, attempt_key=first_key)
        prev = prior.get(row.key) or {}
        o.attempt_key = prev.get("attempt_key") or first_key
        o.job_id = prev.get("job_id")
        if row.error:
            o.state, o.error = "refused", row.error
        elif prev.get("state") == "succeeded" and (
                not download or (prev.get("files") and all((out / f).exists() for f in prev["files"]))):
            o.state, o.files, o.images = "succeeded", prev.get("files", []), prev.get("images", 0)
            skipped.add(row.key)
        elif prev.get("state") in _ENDED_BADLY and not retry_failed:
            o.state, o.error = prev["state"], prev.get("error")
            skipped.add(row.key)
        else:
            if prev.get("state") in ("succeeded", "downloading") and o.job_id:
                o.state = "submitted"  # its job ended well: followed to download, not submitted again
            elif prev.get("state") in (*_ENDED_BADLY, "lost"):
                # A new job, under the next key: the key still names the failed job, or the
                # one whose record is gone (the key can outlive it).
                m = re.search(r"-r(\d+)$", o.attempt_key or "")
                o.attempt_key = f"{first_key}-r{int(m.group(1)) + 1 if m else 1}"
                o.job_id = None
            todo.append(row)
    return outcomes, todo, skipped


def _keep_folders(rows: list[Row], prior: dict[str, dict]) -> None:
    """A row an earlier run recorded keeps its results folder; a new row whose name (its row
    number, where it has none) is another row's folder, recorded or kept, gets a suffix, so
    rows deleted or inserted since never write over another row's results."""
    kept = {id(row) for row in rows if (prior.get(row.key) or {}).get("name")}
    for row in rows:
        if id(row) in kept:
            row.name = prior[row.key]["name"]
    taken = {p["name"].casefold() for p in prior.values() if p.get("name")}
    for row in rows:
        if id(row) not in kept and row.name.casefold() in taken:
            row.name = _unique(row.name, row.index, taken)
        elif id(row) not in kept:
            taken.add(row.name.casefold())


class _Run:
    """One run's submissions, follow-up and downloads, on one thread pool; each row that ends
    is written to the state file at once."""

    def __init__(self, client, state: StateFile, outcomes: dict[str, Outcome], out: Path, download: bool,
                 poll_s: float, concurrency: int):
        self.client, self.state, self.outcomes, self.out = client, state, outcomes, out
        self.download, self.poll_s = download, poll_s
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="easel-batch")
        self.submissions: dict[Future, Row] = {}
        self.interrupted = False  # stopped by Ctrl-C
        self.waiting: dict[str, Outcome] = {}  # job_id -> outcome, submitted and not yet ended
        self.downloads: dict[Future, Outcome] = {}
        self.ended = _Ended(outcomes.values())
        self.submitted = self.finished = self.images = 0
        self.redis_away = False

    def go(self, todo: list[Row], console: Console, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        rows = len(self.outcomes)
        with Progress(*columns, console=console, transient=False) as self.bar:
            self.sub_task = self.bar.add_task("submitted", total=len(todo))
            self.done_task = self.bar.add_task(self.ended.text(), total=rows, completed=rows - len(todo))
            try:
                self._start(todo)
                timed_out = self._follow(deadline)
            except KeyboardInterrupt:  # Ctrl-C: as a timeout, what ended is recorded and summed up
                timed_out, self.interrupted = False, True
            finally:
                for f in self.submissions:
                    f.cancel()
                self.pool.shutdown(wait=True, cancel_futures=True)
            self._leave_downloads()
            unfinished = len(self.submissions) + len(self.waiting) + len(self.downloads)
            undone = f" ({len(self.downloads)} of them finished, not downloaded)" if self.downloads else ""
            if timed_out:
                console.print(f"[yellow]timeout:[/yellow] {unfinished} rows unfinished after {timeout:.0f}s{undone}; "
                              "rerun the same command to resume", soft_wrap=True)
            elif self.interrupted:
                console.print(f"[yellow]interrupted:[/yellow] {unfinished} rows unfinished{undone}; rerun the same "
                              "command to resume", soft_wrap=True)

    def _leave_downloads(self) -> None:
        """Once the pool has stopped: settle the downloads it finished; the others' rows stay
        unfinished, recorded so that a rerun downloads them without submitting their jobs."""
        self._collect_downloads()
        for o in self.downloads.values():
            o.error = NOT_DOWNLOADED
            self.state.write(o)

    def _start(self, todo: list[Row]) -> None:
        """Submit each row, but follow the ones whose job is known to have ended well."""
        for row in todo:
            o = self.outcomes[row.key]
            if o.state == "submitted":
                self.waiting[o.job_id] = o
                self.bar.advance(self.sub_task)
            else:
                self.submissions[self.pool.submit(self._submit, row)] = row

    def _follow(self, deadline: float | None) -> bool:
        """Collect submissions, job ends and downloads until all are in; True if the deadline
        passed first."""
        while self.submissions or self.waiting or self.downloads:
            self._collect_submissions()
            self._poll()
            self._collect_downloads()
            if deadline is not None and time.monotonic() > deadline:
                return True
            if self.submissions or self.waiting or self.downloads:  # a big run's reads spread out
                time.sleep(max(self.poll_s, len(self.waiting) / POLLS_PER_S))
        return False

    def _submit(self, row: Row) -> str:
        return self.client.submit({**row.job, "idempotency_key": self.outcomes[row.key].attempt_key})

    def _collect_submissions(self) -> None:
        from easel.producer.client import SubmitError, SubmitUnavailable

        for fut in [f for f in self.submissions if f.done()]:
            o = self.outcomes[self.submissions.pop(fut).key]
            try:
                o.job_id, o.state = fut.result(), "submitted"
                self.waiting[o.job_id] = o
                self.submitted += 1
                self.state.write(o)  # a rerun finds the job (the idempotency key maps to it too)
            except SubmitUnavailable as e:  # refused for now: a rerun submits it again
                o.state, o.error = "pending", str(e)
                self.bar.advance(self.done_task)
            except SubmitError as e:
                o.state, o.error = "refused", str(e)
                self._settle(o)
            except Exception as e:  # broker/storage trouble: this row only; a rerun retries it
                o.state, o.error = "pending", f"could not submit: {type(e).__name__}: {e}"
                self.bar.advance(self.done_task)
            self.bar.advance(self.sub_task)

    def _poll(self) -> None:
        """Read the waiting jobs' states, on the client's connections for followers (a few
        seconds a try, no retries). While Redis does not answer (a failover, a restart) the
        run says so once and asks again at the next poll: the jobs go on meanwhile, and an
        hours-long run should not end, its summary unwritten, over a minute without Redis;
        ``--timeout`` is checked between polls."""
        try:
            self._read_states()
        except redis.RedisError as e:
            if not self.redis_away:
                self.bar.console.print(f"[yellow]Redis is not answering[/yellow] ({escape(str(e))}); "
                                       "still following, the jobs go on meanwhile", soft_wrap=True)
            self.redis_away = True
            return
        if self.redis_away:
            self.bar.console.print("Redis answers again")
            self.redis_away = False

    def _read_states(self) -> None:
        ids = list(self.waiting)
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            for job_id, (st, err, outputs, man) in zip(part, self.client.follow_store().outcomes_of(part)):
                if st is None:
                    self._lost(self.waiting.pop(job_id))
                    continue
                if st not in TERMINAL:
                    continue
                o = self.waiting.pop(job_id)
                o.error = err or None
                outs = json.loads(outputs or "[]")
                o.images = len(outs)
                if st == "succeeded" and self.download:  # it succeeds once its files are here
                    o.state = "downloading"
                    self.downloads[self.pool.submit(_download, self.client, o, outs, man, self.out / o.name)] = o
                else:
                    o.state = st
                    self._settle(o)

    def _lost(self, o: Outcome) -> None:
        """A job whose record is gone (expired, or lost by Redis) will never end: its row stays
        unfinished, and the state file has a rerun submit it again, under a new key."""
        o.state, o.error = "lost", LOST_REASON
        self.state.write(o)
        self.bar.advance(self.done_task)

    def _collect_downloads(self) -> None:
        for fut in [f for f in self.downloads if f.done() and not f.cancelled()]:
            o = self.downloads.pop(fut)
            try:
                o.files = fut.result()
            except Exception as e:  # the job is fine, the copy is not: a rerun downloads again
                o.state, o.error = "pending", f"download failed: {type(e).__name__}: {e}"
                self.bar.advance(self.done_task)
                continue
            o.state = "succeeded"
            self._settle(o)

    def _settle(self, o: Outcome) -> None:
        self.finished += 1
        self.images += o.images
        self.state.write(o)
        self.ended.add(o)
        self.bar.advance(self.done_task)
        self.bar.update(self.done_task, description=self.ended.text())


def _summarise(summary: Summary, outcomes: dict[str, Outcome]) -> Summary:
    """The counts by outcome, every row that did not succeed with its reason, the throughput."""
    for o in outcomes.values():
        if o.state == "succeeded":
            summary.succeeded += 1
            continue
        if o.state == "cancelled":
            summary.cancelled += 1
        elif o.state in ("failed", "refused"):
            summary.failed += 1
        else:
            summary.pending += 1
        summary.failures.append({"row": o.row, "name": o.name, "state": o.state, "job_id": o.job_id,
                                 "reason": o.error or "unfinished"})
    summary.failures.sort(key=lambda f: f["row"])
    if summary.elapsed_s > 0:
        summary.jobs_per_min = round(summary.finished_this_run / summary.elapsed_s * 60, 2)
        summary.images_per_s = round(summary.images_this_run / summary.elapsed_s, 3)
    return summary


class _Ended:
    """Running counts of rows that ended well and badly, for the progress bar."""

    def __init__(self, outcomes) -> None:
        self.ok = self.bad = 0
        for o in outcomes:
            self.add(o)

    def add(self, o: Outcome) -> None:
        self.ok += o.state == "succeeded"
        self.bad += o.state in ("failed", "refused", "cancelled")

    def text(self) -> str:
        return f"done ({self.ok} ok, {self.bad} failed)"


def _print_summary(console: Console, s: Summary) -> None:
    t = Table(title=f"easel batch: {escape(str(s.manifest))}", show_header=False)  # paths and reasons as typed
    for k, v in [("rows", s.total), ("succeeded", s.succeeded), ("failed", s.failed), ("cancelled", s.cancelled),
                 ("unfinished", s.pending), ("skipped (done before)", s.skipped),
                 ("finished this run", s.finished_this_run), ("elapsed", f"{s.elapsed_s:.1f} s"),
                 ("throughput", f"{s.jobs_per_min:.1f} jobs/min, {s.images_per_s:.2f} images/s"),
                 ("results", s.out)]:
        t.add_row(k, escape(str(v)))
    console.print(t)
    for f in s.failures[:20]:
        console.print(escape(f"  row {f['row']} ({f['name']}): {f['state']}: {f['reason']}"), highlight=False)
    if len(s.failures) > 20:
        console.print(escape(f"  ... {len(s.failures) - 20} more in {Path(s.out) / SUMMARY_FILE}"), highlight=False)
