"""Rich progress bars for following jobs (used by `easel wait`, `easel demo`, `easel batch`)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from easel.shared.schema import JobStatus


def job_progress(console: Console | None = None) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                    TimeElapsedColumn(), console=console, transient=False)


def follow(client, job_ids: list[str], label: dict[str, str] | None = None, timeout: float | None = None,
           console: Console | None = None) -> dict[str, JobStatus]:
    """Wait for jobs, one bar each: stage i/n, denoising step, final state."""
    import time

    label = label or {}
    done: dict[str, JobStatus] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    with job_progress(console) as bar:
        tasks = {j: bar.add_task(label.get(j, j[:12]), total=1, detail="queued") for j in job_ids}
        n_stages = {j: len(client.store.load(j)[0].stages) for j in job_ids}
        while len(done) < len(job_ids):
            for j in job_ids:
                if j in done:
                    continue
                st = client.status(j)
                p = st.progress
                if st.state.terminal:
                    done[j] = st
                    bar.update(tasks[j], total=1, completed=1,
                               detail=st.state.value + (f": {st.error}" if st.error else ""))
                else:
                    stage_txt = f"stage {p.stage + 1}/{n_stages[j]}"
                    bar.update(tasks[j], total=max(p.total_steps, 1), completed=p.step,
                               detail=f"{st.state.value} {stage_txt} step {p.step}/{p.total_steps}")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout}s")
            time.sleep(0.1)
    return done
