"""What `pip install .` gives: one `easel` namespace in the wheel, and a base install (no
extras) that submits and follows jobs without torch, diffusers or FastAPI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

KEEP_OUT = (".git", ".venv", ".venv-lowest", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
            ".hypothesis", ".easel", "easel-out")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the checkout, so the build leaves nothing in the working tree."""
    src = tmp_path_factory.mktemp("src") / "easel"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*KEEP_OUT))
    out = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (found,) = out.glob("easel-*.whl")
    return found


def test_wheel_installs_only_the_easel_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("easel/") for n in code), sorted({n.split("/")[0] for n in code})
    tops = {n.split("/")[1] for n in code}
    assert tops == {"shared", "worker", "producer"}, tops
    assert "easel/shared/models.yaml" in code  # the bundled registry travels with the package
    assert not any(n.startswith(("easel/bench", "easel/tests")) for n in code)
    # Every module of the three folders is in the wheel, none is left behind by the mapping.
    for folder in ("shared", "worker", "producer"):
        for py in (ROOT / folder).rglob("*.py"):
            assert f"easel/{py.relative_to(ROOT).as_posix()}" in code, py


@pytest.mark.slow
def test_base_install_submits_and_follows_a_job_without_torch(wheel, easel_env, sd15_worker, input_png, tmp_path):
    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py, easel = venv / "bin" / "python", venv / "bin" / "easel"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for heavy in ("torch", "diffusers", "transformers", "fastapi", "opentelemetry"):
        r = subprocess.run([str(py), "-c", f"import {heavy}"], capture_output=True, text=True)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, heavy

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(easel), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **easel_env})

    r = run("submit", "--image", str(input_png), "--prompt", "a lighthouse", "--steps", "3", "--seed", "5")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    r = run("wait", job_id, "--timeout", "120")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "succeeded"
    r = run("fetch", job_id, "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / job_id / "output" / "0.png").stat().st_size > 0
    # Commands of other install profiles name the extra to install instead of a traceback.
    for args, extra in ((["worker", "--family", "sd15"], "worker"), (["api"], "api"), (["dev"], "dev")):
        r = run(*args)
        assert r.returncode == 2 and f'pip install ".[{extra}]"' in r.stderr, (args, r.stderr)
    # The Python client from the same venv reads the result the CLI followed.
    r = subprocess.run([str(py), "-c", "import sys; from easel.producer.client import EaselClient; "
                        "print(EaselClient().status(sys.argv[1]).state.value)", job_id],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env={"HOME": str(tmp_path), **easel_env})
    assert r.returncode == 0 and r.stdout.strip() == "succeeded", r.stderr
