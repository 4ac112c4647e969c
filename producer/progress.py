"""Rich progress bars for following jobs (used by `easel wait`, `easel demo`, `easel batch`)."""
from __future__ import annotations

import time

import redis
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from easel.shared.schema import JobStatus


def job_progress(console: Console | None = None) -> Progress:
    # No markup in either text column: labels are manifest rows' names and details carry job
    # errors, which quote users' URLs and keys ("[/...]" would be read as a closing tag).
    return Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(),
                    TextColumn("{task.fields[detail]}", markup=False), TimeElapsedColumn(), console=console,
                    transient=False)


# Bars that say why a queued job waits: a few jobs' (a status read each, costlier than the
# record alone), not a batch's thousands.
EXPLAINED_UP_TO = 4
HINT_TRY_S = 3.0  # one try on the client's quick connections (``EaselClient.follow_store``)


def follow(client, job_ids: list[str], label: dict[str, str] | None = None, timeout: float | None = None,
           console: Console | None = None) -> dict[str, JobStatus]:
    """Wait for jobs, one bar each: stage i/n, denoising step, final state (``client.watch``);
    while one of a few jobs is queued, why it waits where it cannot start."""
    label = label or {}
    done: dict[str, JobStatus] = {}
    explain = len(job_ids) <= EXPLAINED_UP_TO
    deadline = None if timeout is None else time.monotonic() + timeout
    # Once per job and stage (a chain waits again for its next family): each read may cost a
    # short try while Redis is away.
    hints: dict[tuple[str, int], str | None] = {}
    n_stages: dict[str, int] = {}

    def stages_of(job_id: str) -> int | str:
        """Read once, on a quick connection: "?" while Redis is away (the watch waits for it)."""
        if job_id not in n_stages:
            try:
                n_stages[job_id] = len(client.follow_store().load(job_id)[0].stages)
            except redis.RedisError:
                return "?"
        return n_stages[job_id]

    with job_progress(console) as bar:
        tasks = {j: bar.add_task(label.get(j, j[:12]), total=1, detail="queued") for j in job_ids}
        for st in client.watch(job_ids, timeout):
            p = st.progress
            if st.state.terminal:
                done[st.id] = st
                bar.update(tasks[st.id], total=1, completed=1,
                           detail=st.state.value + (f": {st.error}" if st.error else ""))
                continue
            detail = f"{st.state.value} stage {p.stage + 1}/{stages_of(st.id)} step {p.step}/{p.total_steps}"
            key = (st.id, p.stage)
            if explain and st.state.value == "queued" and key not in hints and (
                    deadline is None or deadline - time.monotonic() > HINT_TRY_S):
                hints[key] = waiting_for(client, st.id)
            why = hints.get(key) if st.state.value == "queued" else None
            bar.update(tasks[st.id], total=max(p.total_steps, 1), completed=p.step,
                       detail=detail + (f": {why}" if why else ""))
    return done


def waiting_for(client, job_id: str) -> str | None:
    """Why a queued job cannot start (no live worker for its family, a paused queue), None
    when nothing holds it back. Read on the client's quick connections: a Redis that is away
    costs this hint one short try, not ~30 s of retries."""
    from easel.shared.scheduler import Scheduler

    quick = client.follow_store()
    try:
        return Scheduler(quick).status_of(quick.view(job_id)).waiting_for
    except Exception:  # only a hint
        return None
