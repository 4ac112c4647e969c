"""`easel batch` through the real CLI: a manifest in, results tree and summary out, resumable."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT, cli, img2img_job, png_bytes


def _inputs(folder: Path, n: int) -> list[str]:
    (folder / "in").mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        p = folder / "in" / f"{i}.png"
        p.write_bytes(png_bytes((64, 64), color=(20 * i % 255, 90, 160)))
        names.append(f"in/{p.name}")  # relative to the manifest
    return names


def _job_count(client) -> int:
    return sum(1 for _ in client.store.r.scan_iter("easel:job:*", count=1000))


def test_batch_jsonl_of_20_rows_completes_and_rerun_skips_done_rows(easel_env, sd15_worker, client, tmp_path):
    images = _inputs(tmp_path, 5)
    rows = []
    for i in range(20):
        if i % 4 == 3:  # full job objects and flat rows mix in one manifest
            job = img2img_job(images[i % 5], steps=2, seed=100 + i)
            rows.append({**job, "name": f"full-{i}"})
        else:
            rows.append({"name": f"flat-{i}", "image": images[i % 5], "prompt": f"a fox #{i}", "steps": 2,
                         "strength": 0.5, "seed": i})
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"

    r = cli("batch", str(manifest), "--out", str(out), "--concurrency", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["total"], s["succeeded"], s["failed"], s["skipped"], s["pending"]) == (20, 20, 0, 0, 0)
    assert s["finished_this_run"] == 20 and s["jobs_per_min"] > 0 and s["images_per_s"] > 0
    assert "succeeded" in r.stderr and "throughput" in r.stderr
    for row in rows:
        folder = out / row["name"]
        img = Image.open(folder / "0.png")
        assert img.format == "PNG" and img.size == (64, 64)
        assert json.loads((folder / "manifest.json").read_text())["stages"][0]["params"]["steps"] == 2
    assert json.loads((out / "flat-5" / "manifest.json").read_text())["stages"][0]["seeds"] == [5]

    jobs_before = _job_count(client)
    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["succeeded"], s["skipped"], s["finished_this_run"], s["submitted"]) == (20, 20, 0, 0)
    assert _job_count(client) == jobs_before  # nothing submitted again


@pytest.mark.slow
def test_batch_resumes_unfinished_rows_with_the_same_jobs(easel_env, sd15_worker, client, tmp_path):
    images = _inputs(tmp_path, 2)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(json.dumps({"image": images[i % 2], "prompt": "p", "steps": 2, "seed": i})
                                  for i in range(6)))
    # A long job ahead holds the worker, so the first run stops (timeout) with rows unfinished.
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes((256, 256)))
    # Far longer than the first run (CLI start + 1 s); cancelled once that run has given up.
    blocker = client.submit(img2img_job(str(big), steps=400, strength=1.0))
    out = tmp_path / "out"
    r = cli("batch", str(manifest), "--out", str(out), "--timeout", "1")
    assert r.returncode == 1 and "rerun the same command to resume" in r.stderr
    first = json.loads((out / "summary.json").read_text())
    assert first["pending"] > 0 and first["submitted"] == 6
    submitted = {ln["key"]: ln["job_id"] for ln in map(json.loads, (out / ".easel-batch-state.jsonl")
                                                      .read_text().splitlines())}
    client.cancel(blocker)
    assert client.wait(blocker, timeout=120).state.value == "cancelled"
    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["succeeded"], s["failed"], s["pending"]) == (6, 0, 0)
    final = {ln["key"]: ln["job_id"] for ln in map(json.loads, (out / ".easel-batch-state.jsonl")
                                                  .read_text().splitlines())}
    assert all(final[k] == j for k, j in submitted.items())  # resumed, not resubmitted
    assert len(list(out.glob("row-*/0.png"))) == 6


def _states(out: Path) -> list[dict]:
    """The state file's whole lines so far."""
    with contextlib.suppress(FileNotFoundError):
        text = (out / ".easel-batch-state.jsonl").read_text()
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]
    return []


def _batch(*args: str) -> subprocess.Popen:
    """``easel batch`` with SIGINT as a terminal's shell leaves it (a test run in the
    background may have it ignored, and children inherit that)."""
    return subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "batch", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@contextlib.contextmanager
def _held_row_batch(client, tmp_path: Path, name: str):
    """A one-row batch run whose job waits (its tenant held at a cap of 0, lifted at the
    end), once the run has recorded its submission: yields (the run, its OUT, manifest,
    the state file's first record)."""
    (img,) = _inputs(tmp_path, 1)
    tenant = f"held-{uuid.uuid4().hex[:8]}"
    client.scheduler.set_cap(tenant, 0)
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    manifest.write_text(json.dumps({**img2img_job(img, steps=2), "tenant": tenant, "name": name}) + "\n")
    try:
        batch = _batch(str(manifest), "--out", str(out))
        try:
            deadline = time.monotonic() + 60
            while not (submitted := _states(out)) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield batch, out, manifest, submitted[0]
        finally:
            batch.kill()
    finally:
        client.scheduler.set_cap(tenant, None)


def test_a_row_whose_job_record_is_gone_ends_unfinished_and_a_rerun_submits_it_again(easel_env, sd15_worker,
                                                                                      client, tmp_path):
    """A record gone (its TTL passed, Redis lost it) ends the wait for its row, with the
    reason; the rerun submits the row anew, though its idempotency key still names the job."""
    with _held_row_batch(client, tmp_path, "gone") as (batch, out, manifest, first):
        client.store.r.delete(client.store.key(first["job_id"]))
        _, stderr = batch.communicate(timeout=60)
        assert batch.returncode == 1
        s = json.loads((out / "summary.json").read_text())
        assert (s["succeeded"], s["pending"]) == (0, 1)
        assert s["failures"][0]["reason"] == "job record gone (expired or lost); a rerun submits it again"
        assert "job record gone" in stderr
    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["succeeded"], s["submitted"]) == (1, 1)
    assert _states(out)[-1]["job_id"] != first["job_id"]
    assert Image.open(out / "gone" / "0.png").format == "PNG"


def test_ctrl_c_writes_the_summary_exits_130_and_the_rerun_resumes(easel_env, sd15_worker, client, tmp_path):
    """Ctrl-C while a row's job waits: the run records what it has, writes the summary with
    the row unfinished, says how to resume and exits 130 (as a shell reports Ctrl-C); the
    rerun follows the same job to its end."""
    with _held_row_batch(client, tmp_path, "waits") as (batch, out, manifest, first):
        batch.send_signal(signal.SIGINT)
        _, stderr = batch.communicate(timeout=60)
        assert batch.returncode == 130, stderr[-2000:]
        assert "interrupted" in stderr and "rerun the same command" in stderr
        s = json.loads((out / "summary.json").read_text())
        assert (s["total"], s["succeeded"], s["pending"]) == (1, 0, 1)
    r = cli("batch", str(manifest), "--out", str(out))  # its job goes on as a worker's dispatch moves it
    assert r.returncode == 0, r.stderr[-3000:]
    assert _states(out)[-1]["job_id"] == first["job_id"]  # the same job, not a new one


def test_cancel_ends_a_batchs_unfinished_jobs_and_a_rerun_skips_them(easel_env, sd15_worker, client, tmp_path):
    """``easel batch --cancel`` after a run was killed: every job the batch made and that has
    not ended is cancelled, the one whose submission the run never recorded too (found by its
    row's idempotency key), and recorded; a rerun then submits nothing and counts them
    cancelled."""
    imgs = _inputs(tmp_path, 3)
    tenant = f"held-{uuid.uuid4().hex[:8]}"
    client.scheduler.set_cap(tenant, 0)  # the jobs wait in their tenant's pending set
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    manifest.write_text("".join(json.dumps({**img2img_job(img, steps=2), "tenant": tenant, "name": f"r{i}"}) + "\n"
                                for i, img in enumerate(imgs)))
    try:
        batch = _batch(str(manifest), "--out", str(out))
        try:
            deadline = time.monotonic() + 60
            while len(_states(out)) < 3 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            batch.kill()
            batch.communicate(timeout=30)
        states = _states(out)
        assert [s["state"] for s in states] == ["submitted"] * 3
        lines = (out / ".easel-batch-state.jsonl").read_text().splitlines(keepends=True)
        (out / ".easel-batch-state.jsonl").write_text("".join(lines[:2]))  # killed before it recorded the last
        r = cli("batch", str(manifest), "--out", str(out), "--cancel")
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip() == "cancelled 3; stopping at their next step 0; ended before 0"
        for s in states:
            st = client.status(s["job_id"])
            assert st.state.value == "cancelled" and st.error == "cancelled before it ran", st
        assert {s["job_id"] for s in _states(out)[2:]} == {s["job_id"] for s in states}
        assert all(s["state"] == "cancelled" for s in _states(out)[2:])
        before = _job_count(client)
        r = cli("batch", str(manifest), "--out", str(out))
        assert r.returncode == 1
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["cancelled"], summary["submitted"], summary["skipped"]) == (3, 0, 3), summary
        assert {f["reason"] for f in summary["failures"]} == {"cancelled by easel batch --cancel"}
        assert _job_count(client) == before
    finally:
        client.scheduler.set_cap(tenant, None)
    r = cli("batch", str(manifest), "--out", str(tmp_path / "never-ran"), "--cancel")
    assert r.returncode == 2 and "no batch has run into" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_batch_follows_on_through_a_redis_outage_longer_than_its_clients_retries(easel_env, sd15_worker, client,
                                                                                    tmp_path):
    """Redis stops answering the run for longer than its client's own retries (~30 s) while
    a row's job waits: the run says so and goes on following instead of ending without a
    summary; once Redis answers, the job runs and the run ends as usual, exit 0."""
    from tests.netproxy import TcpProxy

    (img,) = _inputs(tmp_path, 1)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({**img2img_job(img, steps=2), "name": "outage"}) + "\n")
    out = tmp_path / "out"
    family = client.registry.get("sd15").family
    redis_port = int(client.settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(redis_port).start()
    client.pause(family)  # the job waits until Redis is back
    batch = subprocess.Popen([sys.executable, "-m", "easel.producer.cli", "batch", str(manifest), "--out", str(out)],
                             cwd=ROOT, env={**os.environ, "EASEL_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not _states(out) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _states(out), "the row was not submitted"
        proxy.stop()
        time.sleep(45)
        assert batch.poll() is None  # still following
        proxy = TcpProxy(redis_port, listen_port=proxy.port).start()
        client.resume(family)
        _, stderr = batch.communicate(timeout=120)
        assert batch.returncode == 0, stderr[-3000:]
        assert "Redis is not answering" in stderr and "Redis answers again" in stderr
        s = json.loads((out / "summary.json").read_text())
        assert (s["succeeded"], s["pending"]) == (1, 0)
        assert Image.open(out / "outage" / "0.png").format == "PNG"
    finally:
        client.resume(family)
        proxy.stop()
        batch.kill()


def test_a_timeout_leaves_finished_jobs_not_downloaded_unfinished_and_a_rerun_downloads_them(
        easel_env, sd15_worker, services, client, tmp_path):
    """S3 stops answering as the downloads begin, and the timeout passes: the rows whose files
    are not on disk are unfinished, not succeeded, and the rerun downloads them without
    submitting anything."""
    images = _inputs(tmp_path, 2)
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"image": images[i % 2], "prompt": "p", "steps": 2, "seed": i}) + "\n"
                                for i in range(12)))
    out = tmp_path / "out"
    assert cli("batch", str(manifest), "--out", str(out), "--no-download").returncode == 0  # all 12 ended well
    jobs_before = _job_count(client)

    batch = _batch(str(manifest), "--out", str(out), "--concurrency", "1", "--timeout", "5")
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("row-*")) and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(services.s3.proc.pid, signal.SIGSTOP)  # a download hangs, the others wait behind it
        time.sleep(7)  # past the batch's timeout
    finally:
        os.kill(services.s3.proc.pid, signal.SIGCONT)
    try:
        _, stderr = batch.communicate(timeout=60)
    finally:
        batch.kill()
    assert batch.returncode == 1, stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    downloaded = [d for d in out.glob("row-*") if {f.name for f in d.iterdir()} == {"0.png", "manifest.json"}]
    assert 0 < s["succeeded"] == len(downloaded) < 12 and s["pending"] == 12 - len(downloaded)
    assert {f["reason"] for f in s["failures"]} == {"finished, not downloaded in time; a rerun downloads it"}
    assert "not downloaded" in stderr

    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["succeeded"], s["submitted"]) == (12, 0)
    assert len(list(out.glob("row-*/0.png"))) == 12 and _job_count(client) == jobs_before


def test_batch_csv_reports_each_failure_with_its_reason(easel_env, sd15_worker, client, tmp_path):
    (img,) = _inputs(tmp_path, 1)
    manifest = tmp_path / "jobs.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "image", "prompt", "strength", "steps", "seed", "format"])
        w.writerow(["good", img, "a castle", "0.5", "2", "1", "webp"])
        w.writerow(["too-strong", img, "a castle", "1.5", "2", "1", ""])
        w.writerow(["no-file", "in/missing.png", "a castle", "0.5", "2", "1", ""])
        w.writerow(["gone-from-s3", "s3://easel/inputs/not-there.png", "a castle", "0.5", "2", "1", ""])
        # A name that does not resolve may resolve later: left for a rerun, not refused for good.
        w.writerow(["no-dns-now", "https://images.invalid/cat.png", "a castle", "0.5", "2", "1", ""])
    out = tmp_path / "out"
    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 1
    s = json.loads((out / "summary.json").read_text())
    assert (s["total"], s["succeeded"], s["failed"], s["pending"]) == (5, 1, 3, 1)
    reasons = {f["name"]: f["reason"] for f in s["failures"]}
    assert "stages.0.strength" in reasons["too-strong"]
    assert "no such file" in reasons["no-file"]
    assert "s3://easel/inputs/not-there.png does not exist" in reasons["gone-from-s3"]
    assert Image.open(out / "good" / "0.webp").format == "WEBP"
    assert "row 2 (too-strong)" in r.stderr

    # Another results folder starts over with new jobs; a rerun into it resumes them, and
    # downloads what an earlier --no-download run left in S3.
    out2, before = tmp_path / "out2", _job_count(client)
    r = cli("batch", str(manifest), "--out", str(out2), "--no-download")
    assert r.returncode == 1 and not (out2 / "good").exists()
    assert _job_count(client) == before + 1  # good: the others never became jobs
    r = cli("batch", str(manifest), "--out", str(out2))
    assert r.returncode == 1 and Image.open(out2 / "good" / "0.webp").format == "WEBP"
    assert _job_count(client) == before + 1


def test_rows_of_the_wrong_shape_fail_alone_and_the_others_run(easel_env, sd15_worker, client, tmp_path):
    """A row whose stages are not a list of objects, or whose path names a home folder of no
    such user, fails with its reason; the run goes on with the others and writes its summary."""
    (img,) = _inputs(tmp_path, 1)
    manifest = tmp_path / "jobs.jsonl"
    rows = [{"name": "good", "image": img, "prompt": "p", "steps": 2, "seed": 1},
            {"name": "stages-not-a-list", "input": {"image": img}, "stages": 5},
            {"name": "stage-not-an-object", "input": {"image": img}, "stages": [5]},
            {"name": "no-such-user", "image": "~no-such-user-easel/cat.png", "prompt": "p"}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert (s["total"], s["succeeded"], s["failed"]) == (4, 1, 3)
    reasons = {f["name"]: f["reason"] for f in s["failures"]}
    assert "stages" in reasons["stages-not-a-list"] and "stages.0" in reasons["stage-not-an-object"]
    assert "no-such-user-easel" in reasons["no-such-user"]


def test_a_rerun_after_rows_were_deleted_and_added_keeps_every_rows_folder(easel_env, sd15_worker, client, tmp_path):
    """Unnamed rows get folders by row number. After the first row is deleted and one is
    added, the rerun keeps each earlier row's folder (its results stay its own) and gives
    the new row a folder no other row's results are in."""
    images = _inputs(tmp_path, 1)
    rows = [{"image": images[0], "prompt": f"p{i}", "steps": 2, "seed": i} for i in range(4)]
    manifest, out = tmp_path / "jobs.jsonl", tmp_path / "out"
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows[:3]))
    assert cli("batch", str(manifest), "--out", str(out)).returncode == 0

    def seed_in(folder: str) -> int:
        return json.loads((out / folder / "manifest.json").read_text())["stages"][0]["seeds"][0]

    assert [seed_in(f"row-{i:05d}") for i in (1, 2, 3)] == [0, 1, 2]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows[1:]))  # row 0 deleted, row 3 added
    r = cli("batch", str(manifest), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert [seed_in(f"row-{i:05d}") for i in (1, 2, 3)] == [0, 1, 2]  # nothing written over
    assert seed_in("row-00003-00003") == 3


@pytest.mark.slow
def test_a_batch_with_redis_out_of_reach_exits_3_before_any_row(easel_env, tmp_path):
    """A wrong EASEL_REDIS_URL fails the run once (its client's retries, ~30 s), exit 3 and
    one line, not each row of a long manifest after its own retries."""
    from easel.producer.embedded import free_port

    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps({"image": "s3://easel/inputs/x.png", "prompt": f"p{i}"}) + "\n"
                                for i in range(50)))
    r = cli("batch", str(manifest), "--out", str(tmp_path / "out"),
            env={**os.environ, "EASEL_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, timeout=240)
    assert r.returncode == 3 and "cannot reach Redis" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_manifest_rows_are_read_as_csv_and_json_lines_define_them(tmp_path):
    """Quoted CSV fields keep their commas and line breaks; a row with more fields than the
    header is refused, not cut short; a JSON line may hold any character; a file that is not
    UTF-8 is refused as a whole. A row's identity is the job it makes: another default model,
    another folder's file of the same name or an edited image is another job."""
    import os

    from easel.producer.batch import BatchError, read_manifest

    (tmp_path / "cat.png").write_bytes(png_bytes((16, 16)))
    manifest = tmp_path / "jobs.csv"
    manifest.write_text('image,prompt\ncat.png,"a cat, in space"\ncat.png,a cat, in space, oil painting\n'
                        'cat.png,"two\nlines"\n', encoding="utf-8")
    good, extra, multi = read_manifest(manifest)
    assert good.job["stages"][0]["prompt"] == "a cat, in space" and not good.error
    tenants = tmp_path / "tenants.csv"
    tenants.write_text("image,prompt,tenant\ncat.png,a cat,catalog-refresh\n", encoding="utf-8")
    (row,) = read_manifest(tenants)
    assert row.job["tenant"] == "catalog-refresh" and not row.error
    assert extra.job is None and "4 fields, the header has 2; quote fields that hold commas" in extra.error
    assert multi.job["stages"][0]["prompt"] == "two\nlines"

    lines = tmp_path / "jobs.jsonl"
    lines.write_text(json.dumps({"image": "cat.png", "prompt": "a\u2028b\x85c"}, ensure_ascii=False) + "\n",
                     encoding="utf-8")
    (row,) = read_manifest(lines)
    assert row.job["stages"][0]["prompt"] == "a\u2028b\x85c"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,prompt\ncat.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(BatchError, match="not UTF-8"):
        read_manifest(latin)

    key = read_manifest(lines)[0].key
    assert read_manifest(lines)[0].key == key  # the same row, the same job
    assert read_manifest(lines, default_model="comic-diffusion")[0].key != key
    other = tmp_path / "other"
    other.mkdir()
    (other / "cat.png").write_bytes(png_bytes((16, 16)))
    (other / "jobs.jsonl").write_text(lines.read_text(encoding="utf-8"), encoding="utf-8")
    assert read_manifest(other / "jobs.jsonl")[0].key != key
    os.utime(tmp_path / "cat.png", ns=(1, 1))  # edited since
    assert read_manifest(lines)[0].key != key


def test_each_row_gets_a_results_folder_of_its_own(tmp_path):
    """Repeated names get the row number, and a name that another row's numbered repeat
    already took (or one differing only in case, one folder on macOS) gets another."""
    from easel.producer.batch import read_manifest

    manifest = tmp_path / "jobs.jsonl"
    names = ["cat", "cat-00003", "cat", "Cat", "", "row-00005"]
    manifest.write_text("".join(json.dumps({"image": "s3://b/x.png", "prompt": "p", "name": n}) + "\n"
                                for n in names))
    got = [row.name for row in read_manifest(manifest)]
    assert got == ["cat", "cat-00003", "cat-00003-2", "Cat-00004", "row-00005", "row-00005-00006"]
    assert len({n.casefold() for n in got}) == len(got)


def test_a_row_named_like_the_summary_file_gets_a_folder_beside_it(tmp_path):
    """OUT/summary.json is the run's summary: a row of that name gets the row number, or its
    results folder would stop the summary being written at the end of the run."""
    from easel.producer.batch import SUMMARY_FILE, read_manifest

    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(json.dumps({"image": "s3://b/x.png", "prompt": "p", "name": SUMMARY_FILE}) + "\n")
    assert [row.name for row in read_manifest(manifest)] == [f"{SUMMARY_FILE}-00001"]


def test_the_run_summary_shows_reasons_and_paths_as_written(tmp_path):
    """A failure's reason, a row's name and the manifest's path are the user's or a worker's
    text: brackets in them are shown, not read as console markup (which stopped the run's
    summary with a MarkupError)."""
    import io

    from rich.console import Console

    from easel.producer.batch import Summary, _print_summary

    buf = io.StringIO()
    s = Summary(manifest=str(tmp_path / "[set]/jobs.jsonl"), out=str(tmp_path / "out"), total=1, failed=1,
                failures=[{"row": 1, "name": "[/x]", "state": "failed", "reason": "bad input [/red] [bold]"}])
    _print_summary(Console(file=buf, width=400), s)
    text = buf.getvalue()
    assert "row 1 ([/x]): failed: bad input [/red] [bold]" in text and "[set]/jobs.jsonl" in text, text
