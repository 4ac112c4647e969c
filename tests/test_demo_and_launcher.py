"""`easel demo` on a machine with nothing configured, and `easel worker` supervising its processes."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_easel_demo_from_nothing_prints_a_real_png(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASEL_")}
    env["HOME"] = str(tmp_path / "home")  # no cached checkpoints: the demo makes its own
    r = subprocess.run([sys.executable, "-m", "easel.producer.cli", "demo", "--out", str(tmp_path / "out"), "--steps", "3",
                        "--size", "64"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    pngs = [Path(line.strip()) for line in r.stdout.splitlines() if line.strip().endswith("output/0.png")]
    assert len(pngs) == 2  # the img2img job and the chain job
    for p in pngs:
        img = Image.open(p)
        assert img.format == "PNG" and img.size == (64, 64)
    chain = json.loads((pngs[1].parent.parent / "manifest.json").read_text())
    assert [s["handoff_in"] for s in chain["stages"]] == ["image", "latent", "latent"]
    assert "embedded valkey-server" in r.stdout and "embedded SeaweedFS" in r.stdout


def test_a_killed_demo_leaves_no_server_or_worker_behind(model_root, tmp_path):
    """SIGKILL (no code of the demo's runs): its valkey and worker get SIGTERM and exit. Its
    SeaweedFS gets the same (one setting for both servers) but takes ~15 s to stop, so it is
    only killed here."""
    import re
    import shutil

    import psutil

    env = {k: v for k, v in os.environ.items() if not k.startswith("EASEL_")}
    env.update(HOME=str(tmp_path / "home"), EASEL_MODEL_ROOT=str(model_root))  # checkpoints made already
    demo = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "demo", "--out", str(tmp_path / "out")],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cmds: dict[psutil.Process, str] = {}
    line = ""
    try:
        lines = iter(demo.stdout)
        while not (line := next(lines)).startswith("workers:"):  # the servers are up and the worker started
            pass
        cmds = {p: " ".join(p.cmdline()) for p in psutil.Process(demo.pid).children(recursive=True)}
        demo.kill()
        demo.wait()
        _, alive = psutil.wait_procs([p for p, cmd in cmds.items() if "valkey-server" in cmd or "worker" in cmd],
                                     timeout=15)
        assert len(cmds) == 3 and not alive, cmds
    finally:
        demo.kill()
        for p in cmds:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        temp = re.findall(r"-dir=(\S+)/seaweedfs/data|logs in (\S+)\)", " ".join([*cmds.values(), line]))
        for folder in [a or b for a, b in temp]:  # the demo's temp folders
            shutil.rmtree(folder, ignore_errors=True)


def test_easel_worker_restarts_a_process_that_dies(easel_env, tmp_path):
    r = redis.Redis.from_url(easel_env["EASEL_REDIS_URL"], decode_responses=True)
    log = open(tmp_path / "launcher.log", "wb")
    launcher = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "worker", "--family", "sdxl-refiner"],
                                env={**os.environ, **easel_env}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)

    def presence() -> list[dict]:
        return [json.loads(v) for k in r.scan_iter("easel:worker:sdxl-refiner-cpu@*") if (v := r.get(k))]

    try:
        deadline = time.monotonic() + 120
        while not presence() and time.monotonic() < deadline:
            time.sleep(0.2)
        (first,) = presence()
        os.kill(first["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = presence()
            if now and now[0]["pid"] != first["pid"]:
                break
            time.sleep(0.2)
        else:
            raise AssertionError((tmp_path / "launcher.log").read_text()[-3000:])
        assert launcher.poll() is None
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
    # The launcher's own line is in the log format too (json: stderr is a file here).
    restarts = [rec for line in (tmp_path / "launcher.log").read_text().splitlines()
                if line.startswith("{") and "restarting in" in (rec := json.loads(line))["message"]]
    assert [(rec["family"], rec["exit_code"], rec["level"]) for rec in restarts] == [("sdxl-refiner", -9, "WARNING")]


def _as_in_a_terminal() -> None:
    """A child's SIGINT as a terminal's shell leaves it (a test run in the background may
    have it ignored, and children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_easel_worker_lets_the_running_stage_finish(easel_env, client, tmp_path):
    """A terminal's Ctrl-C goes to its whole foreground process group. The launcher asks each
    of its processes once, for a warm shutdown: the running job ends succeeded, not cut short
    by a second SIGINT (Celery's cold shutdown), and the launcher exits 0. (sd15-wide: no
    worker of the test session serves it, so the job runs on this launcher's.)"""
    from tests.conftest import img2img_job, png_bytes

    r = redis.Redis.from_url(easel_env["EASEL_REDIS_URL"], decode_responses=True)
    log = tmp_path / "launcher.log"
    with open(log, "wb") as out:  # a session of its own, as a shell's job: its group is the terminal's
        launcher = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "worker", "--family", "sd15-wide"],
                                    env={**os.environ, **easel_env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=_as_in_a_terminal)
    try:
        deadline = time.monotonic() + 120
        while not any(r.scan_iter("easel:worker:sd15-wide-cpu@*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        image = client.storage.put_input(png_bytes((64, 64)), "png")
        job_id = client.submit(img2img_job(image, model="sd15-wide", steps=60, strength=1.0, seed=3))
        while int(r.hget(f"easel:job:{job_id}", "step") or 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.hget(f"easel:job:{job_id}", "worker").startswith("sd15-wide-cpu@")
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C does
        assert launcher.wait(120) == 0, log.read_text()[-3000:]
        st = client.status(job_id)
        assert st.state.value == "succeeded" and st.attempts == 1, (st.state, st.error)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)


def test_a_stop_during_a_restart_wait_starts_nothing(easel_env, tmp_path):
    """A process in a crash loop (here: its checkpoint folder is missing) waits out a backoff
    before each restart. A stop asked then ends the launcher at once: no process is started
    after it, none left running unasked."""
    import yaml

    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"models": {"gone": {
        "source": str(tmp_path / "no-such-checkpoint"), "family": "gone", "latent_space": "sd1-vae", "kind": "sd"}}}))
    log = tmp_path / "launcher.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "worker", "--family", "gone"],
                                    env={**os.environ, **easel_env, "EASEL_MODELS": str(models)}, cwd=ROOT,
                                    stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "restarting in" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher.send_signal(signal.SIGTERM)  # during the first backoff (1 s)
        t0 = time.monotonic()
        assert launcher.wait(60) == 1  # its process failed
        assert time.monotonic() - t0 < 3, log.read_text()[-2000:]  # no new process, loading for seconds
    finally:
        launcher.kill()
    assert log.read_text().count("restarting in") == 1


def test_restart_backoff_grows_in_a_crash_loop_and_resets_after_healthy_service():
    from easel.worker.launcher import RestartBackoff

    b = RestartBackoff(first_s=1, max_s=60, healthy_s=120)
    assert [b.delay("0", ran_s=2) for _ in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert b.delay("0", ran_s=3600) == 1  # it had served for an hour: not a crash loop
    assert b.delay("0", ran_s=2) == 2
    assert b.delay("1", ran_s=2) == 1  # each GPU's slot has its own


def test_each_gpu_process_is_pinned_to_a_gpu_the_launcher_was_given(monkeypatch):
    """Under CUDA_VISIBLE_DEVICES=2,3 (Slurm, a shared host) the children get GPUs 2 and 3,
    not the ordinals 0 and 1, which name other physical GPUs. (No GPU here: torch is told
    it sees two.)"""
    import torch

    from easel.worker.launcher import detect_gpus

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert detect_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1f2e, GPU-9a8b")
    assert detect_gpus() == ["GPU-1f2e", "GPU-9a8b"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert detect_gpus() == ["0", "1"]


def test_a_worker_without_a_registry_refuses_to_serve_random_weights(easel_env, tmp_path):
    env = {k: v for k, v in {**os.environ, **easel_env}.items() if k != "EASEL_MODELS"}
    r = subprocess.run([sys.executable, "-m", "easel.worker.process", "--family", "sd15"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "no model registry: set EASEL_MODELS" in r.stderr and "EASEL_MODELS=tiny" in r.stderr
    # `easel worker` refuses before it starts (and restarts) any process
    r = subprocess.run([sys.executable, "-m", "easel.producer.cli", "worker", "--family", "sd15"], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no model registry: set EASEL_MODELS" in r.stdout + r.stderr


def test_the_manifest_names_the_registry_and_each_stages_weights(client, sd15_worker, input_png):
    from tests.conftest import img2img_job

    st = client.wait(client.submit(img2img_job(str(input_png), steps=2)), timeout=120)
    m = client.result(st.id)
    assert m.registry == "tiny"
    assert m.stages[0].model_source.endswith("tiny-sd15")


def test_fetch_writes_the_stored_manifest_last_so_its_presence_means_complete(client, sd15_worker, input_png,
                                                                                tmp_path):
    """``easel fetch`` (the demo's download): the manifest is the stored object byte for byte,
    a newer worker's fields included, and a fetch stopped by a missing output leaves none."""
    from easel.shared.storage import NotFound, S3Ref
    from tests.conftest import img2img_job

    st = client.wait(client.submit(img2img_job(str(input_png), steps=2)), timeout=120)
    stored = json.loads(client.storage.get(st.manifest))
    client.storage.put(S3Ref.parse(st.manifest).key, json.dumps({**stored, "from_a_newer_worker": 1}).encode())
    client.fetch(st.id, tmp_path / "a")
    folder = tmp_path / "a" / st.id
    assert (folder / "manifest.json").read_bytes() == client.storage.get(st.manifest)
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) == ["manifest.json", "output",
                                                                                  "output/0.png"]
    client.storage.delete_prefix(f"jobs/{st.id}/output/")  # retention took the image
    with pytest.raises(NotFound):
        client.fetch(st.id, tmp_path / "b")
    assert not (tmp_path / "b" / st.id / "manifest.json").exists()


def test_the_launchers_exit_code_says_how_its_processes_ended():
    """0 when each ended cleanly, drained or by the SIGTERM of a stop asked (a process still
    loading its model has no handler for it yet); the worst otherwise, a death by a signal
    as a shell shows it (128 + the signal), never a negative status."""
    import signal as sig

    from easel.worker.launcher import exit_code

    assert exit_code([0, -sig.SIGTERM], stopped=True) == 0
    assert exit_code([0, -sig.SIGTERM], stopped=False) == 128 + sig.SIGTERM
    assert exit_code([1, -sig.SIGKILL], stopped=True) == 128 + sig.SIGKILL
    assert exit_code([75, 0], stopped=True) == 75 and exit_code([], stopped=True) == 0
