"""``python -m bench profile``: where a worker's per-job time goes, beyond the pipeline call.

Not part of the default run. Runs the real task body (``easel.worker.tasks.run_segment`` with a
real ``WorkerContext``: valkey, SeaweedFS, warm pipelines) in this process under
pyinstrument (wall clock, so network waits count), for N one-stage img2img jobs, and
attributes every sampled millisecond to a component:

- ``pipeline call``: the diffusers ``__call__`` less the step hook inside it;
- ``step hook``: easel's per-step callback (progress to Redis, cancel check);
- each call ``execute_segment`` / ``_finish`` / ``_load_input`` make, by name.

Celery's own per-message cost (fetch, ack) is outside the task body: ``bench overhead``
measures it with its probe (``Celery fetch/ack gap``). With ``--py-spy`` it also records
the real worker process with py-spy while it serves the same kind of jobs.
Prints ``profile_*`` lines (ms per job) and writes the full tree to a text file.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

from bench.common import (SIZES, BenchEnv, bench_image, headline, img2img_jobs, log, median, model_root, png_bytes)

DEFAULT_N = 20


# easel functions whose direct calls are reported one by one (old and new names)
_PARENTS = ("run_segment", "execute_segment", "_finish", "finish", "_load_input", "run_stage", "start_delivery")


def _label(child, parent_fn: str, parent_fp: str, parent_label: str) -> str:
    fn = child.function or "?"
    fp = (child.file_path or "").replace("\\", "/")
    name = f"{child.class_name}.{fn}" if getattr(child, "class_name", None) else fn
    if parent_label.startswith("pipeline call"):
        if "/worker/" in fp and fn in ("on_step", "cb", "__call__"):
            return "step hook (progress to Redis, inside the pipeline call)"
        return parent_label
    if parent_label.startswith("step hook"):
        return parent_label
    if fn == "__call__" and "diffusers/pipelines" in fp:
        return "pipeline call"
    if parent_fn in _PARENTS and "/worker/" in parent_fp:
        return f"{parent_fn} > {name}"
    return parent_label


def _walk(frame, label: str, acc: dict[str, float], parent_fn: str = "", parent_fp: str = "") -> None:
    """Attribute each frame's own time (its time less its children's) to ``label``."""
    acc[label] += max(0.0, frame.time - sum(c.time for c in frame.children))
    fp = (frame.file_path or "").replace("\\", "/")
    # comprehensions are transparent: their calls count as their enclosing function's
    fn_for_children, fp_for_children = ((parent_fn, parent_fp) if (frame.function or "").startswith("<")
                                        else (frame.function or "", fp))
    for child in frame.children:
        _walk(child, _label(child, fn_for_children, fp_for_children, label), acc, fn_for_children, fp_for_children)


def run(env: BenchEnv, n: int = DEFAULT_N, size: str = "small", out: str | None = None, py_spy: bool = False,
        timeline: bool = False) -> dict:
    from pyinstrument import Profiler

    model, family, _ = SIZES[size]
    os.environ.update({**env.service_env, "EASEL_MODEL_ROOT": str(model_root()), "EASEL_MODELS": env.env["EASEL_MODELS"]})
    from easel.shared.settings import get_settings

    get_settings.cache_clear()
    from easel.worker.context import WorkerContext, set_context
    from easel.shared.celery_app import RUN_SEGMENT
    from easel.worker import tasks

    app = tasks.app
    if hasattr(tasks, "register_tasks") and RUN_SEGMENT not in app.tasks:
        tasks.register_tasks(app, 1)  # the plain (not micro-batched) task, as `easel worker` runs by default
    run_segment = app.tasks[RUN_SEGMENT]

    client = env.client()
    ctx = WorkerContext.create(family, hostname="bench-profile")
    ctx.storage.ensure_bucket()
    ctx.cache.warm()
    set_context(ctx, app)
    ref = client.storage.put_input(png_bytes(bench_image()), "png")
    ids = client.submit_many(img2img_jobs(ref, model, n + 2, seed0=0))  # messages stay queued, unconsumed
    timeline_ids = client.submit_many(img2img_jobs(ref, model, n, seed0=1000)) if timeline else []
    for j in ids[:2]:  # warm-up
        run_segment(j, 0)
    prof = Profiler(interval=0.0005)
    per_job = []
    prof.start()
    for j in ids[2:]:
        t0 = time.perf_counter()
        res = run_segment(j, 0)
        per_job.append(time.perf_counter() - t0)
        assert res == "succeeded", (j, res, client.status(j).error)
    session = prof.stop()
    root = session.root_frame()
    acc: dict[str, float] = defaultdict(float)
    _walk(root, "other (outside the task body)", acc)
    total = sum(per_job)
    rows = sorted(((v / n * 1000, k) for k, v in acc.items() if v > 0), reverse=True)
    pipeline_ms = acc["pipeline call"] / n * 1000
    outside_ms = (total / n * 1000) - pipeline_ms
    log(f"{n} jobs ({model}), {total / n * 1000:.1f} ms/job; pipeline call {pipeline_ms:.1f} ms/job; "
        f"everything else {outside_ms:.1f} ms/job:")
    for ms, k in rows:
        if k != "pipeline call" and ms >= 0.05:
            log(f"  {ms:7.2f} ms/job  {k}")
    text = prof.output_text(unicode=False, color=False, show_all=False)
    path = out or str(env.tmp / "profile-worker.txt")
    with open(path, "w") as fh:
        fh.write(text)
    log(f"full pyinstrument tree: {path}")
    result = {"job_ms_p50": median(per_job) * 1000, "pipeline_ms": pipeline_ms, "rest_ms": outside_ms,
              "components_ms": {k: ms for ms, k in rows}}
    if timeline:
        result["timeline_ms"] = _timeline(ctx, run_segment, timeline_ids)
    if py_spy:
        result["py_spy"] = _py_spy(env, client, ref, model, family, n)
    headline("profile_job_ms", f"{total / n * 1000:.1f}")
    headline("profile_pipeline_ms", f"{pipeline_ms:.1f}")
    headline("profile_rest_ms", f"{outside_ms:.1f}")
    return {"headline": {}, "details": result}


_MARKS = ("claim_start", "claim_end", "call_start", "call_end", "encode_start", "encode_end", "image_put_start",
          "image_put_end", "manifest_put_start", "manifest_put_end", "final_state_start", "final_state_end", "task_end")


def _timeline(ctx, run_segment, ids: list[str]) -> dict[str, float]:
    """The task body's steps for each job, timed (not sampled) and placed relative to the end of
    its pipeline call: claim, call, the image's encode and upload, the manifest upload, the
    final state. Wrappers around the calls the task makes, removed afterwards."""
    import threading

    from easel.worker import segment

    marks: dict[str, float] = {}
    lock = threading.Lock()

    def timed(name: str, fn):
        def wrapper(*a, **kw):
            with lock:
                marks.setdefault(f"{name}_start", time.perf_counter())
            try:
                return fn(*a, **kw)
            finally:
                with lock:
                    marks.setdefault(f"{name}_end", time.perf_counter())
        return wrapper

    last_image: list = []

    def encode(img, *a, **kw):
        last_image[:] = [(img, a, kw)]
        return timed("encode", orig["encode_image"])(img, *a, **kw)

    def put(key, data, *a, **kw):
        return timed("manifest_put" if key.endswith(".json") else "image_put", orig["put"])(key, data, *a, **kw)

    orig = {"run_stage": segment.run_stage, "encode_image": segment.encode_image, "put": ctx.storage.put,
            "transition": ctx.store.transition, "claim": ctx.store.claim}
    segment.run_stage = timed("call", orig["run_stage"])
    segment.encode_image = encode
    ctx.storage.put = put
    ctx.store.transition = timed("final_state", orig["transition"])
    ctx.store.claim = timed("claim", orig["claim"])
    rows: list[dict[str, float]] = []
    try:
        for j in ids:
            marks.clear()
            assert run_segment(j, 0) == "succeeded"
            marks["task_end"] = time.perf_counter()
            rows.append({k: (v - marks["call_end"]) * 1000 for k, v in marks.items()})
    finally:
        segment.run_stage, segment.encode_image = orig["run_stage"], orig["encode_image"]
        ctx.storage.put, ctx.store.transition, ctx.store.claim = orig["put"], orig["transition"], orig["claim"]
    out = {k: median([r[k] for r in rows if k in r]) for k in _MARKS if any(k in r for r in rows)}
    log(f"timeline of {len(ids)} jobs, p50 ms relative to the end of the pipeline call: "
        + ", ".join(f"{k} {v:+.1f}" for k, v in out.items()))
    if last_image:  # the same encode with nothing else running: how much the finish's company slows it
        img, a, kw = last_image[0]
        alone = []
        for _ in range(10):
            t0 = time.perf_counter()
            orig["encode_image"](img, *a, **kw)
            alone.append(time.perf_counter() - t0)
        out["encode_alone_ms"] = median(alone) * 1000
        log(f"the last job's image encoded alone, p50 of 10: {out['encode_alone_ms']:.1f} ms")
    return out


def _py_spy(env: BenchEnv, client, ref: str, model: str, family: str, n: int) -> dict:
    """py-spy on a real worker process serving n queued jobs (includes Celery's own loop)."""
    import subprocess

    from bench.common import EventWatcher

    worker = env.worker(family)
    out = env.tmp / "py-spy-worker.txt"
    watcher = EventWatcher(env.redis_url)
    try:
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(worker.proc.pid), "--rate", "500", "--idle",
                                "--format", "raw", "--output", str(out), "--nonblocking"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        ids = client.submit_many(img2img_jobs(ref, model, n, seed0=500))
        watcher.wait(ids)
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(30)
    finally:
        watcher.close()
        worker.stop()
    buckets: dict[str, int] = defaultdict(int)
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.startswith("_run_module_as_main"):
            continue  # other Python threads (heartbeat, watchdog): idle, not on the job's path
        c = int(count)
        total += c
        if "__call__ (diffusers/pipelines" in stack:
            key = "step hook" if "on_step (" in stack else "pipeline call"
        elif "execute_segment (" in stack:
            key = "task body, outside the pipeline"
        elif "run_segment (" in stack or "guarded (" in stack:
            key = "task wrapper"
        elif "_epoll.poll" in stack or "_brpop" in stack:
            key = "waiting for a message (poll)"
        else:
            key = "celery/kombu (fetch, ack, dispatch)"
        buckets[key] += c
    log(f"py-spy on the worker's main thread, {n} jobs ({out}; shares of its samples, including ~1 s idle "
        f"before the jobs were submitted): " + ", ".join(
            f"{k} {v / total:.1%}" for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])))
    return {"samples": total, "share": {k: v / total for k, v in buckets.items()}}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    ap.add_argument("--size", default="small", choices=list(SIZES))
    ap.add_argument("--out", default=None, help="where to write the pyinstrument tree (text)")
    ap.add_argument("--py-spy", action="store_true", help="also record a real worker with py-spy")
    ap.add_argument("--timeline", action="store_true",
                    help="also time each step after the pipeline call (encode, uploads, final state) for n more jobs")


def main(env: BenchEnv, args) -> dict:
    return run(env, n=args.n, size=args.size, out=args.out, py_spy=args.py_spy, timeline=args.timeline)
