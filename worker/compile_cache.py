"""Warm restarts of compiled workers: torch.compile's caches kept in one folder per host.

A cold ``torch.compile`` of SD 1.5 takes a minute or more per shape; a restarted worker
(rollout, crash, autoscaling) would pay it again before its first job. Two caches avoid
that: inductor's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``: compiled
graphs and kernels, looked up by a hash of the graph) and torch's portable "mega-cache"
(``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``), one file that
pre-fills those caches. The file is named by family (each holds what its own process
compiled, so families sharing a host's volume keep one each), torch version and device,
since compiled kernels are valid only for the GPU model and torch build that made them.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

import torch

from easel.shared.settings import Settings

log = logging.getLogger("easel.worker.compile_cache")


def cache_dir(settings: Settings) -> Path:
    """EASEL_COMPILE_CACHE_DIR, else ``<model_root>/.compile-cache`` (beside the weights, on
    the volume a host keeps across worker restarts)."""
    return Path(settings.compile_cache_dir or Path(settings.model_root) / ".compile-cache")


def configure(folder: Path) -> Path:
    """Point inductor and Triton at ``folder`` before anything compiles; variables the
    operator set explicitly win. Returns the folder in use: a temporary one, with a warning,
    where ``folder`` cannot be made (a read-only volume, another owner), since a cache that
    cannot be kept only costs cold compiles after a restart."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as e:
        fallback = _fallback_folder()
        log.warning("compile cache folder %s unusable (%s); using %s on local disk: set EASEL_COMPILE_CACHE_DIR "
                    "to a writable volume for warm restarts across machines", folder, e, fallback)
        folder = fallback
    # inductor writes its default into the environment the first time anything asks for it:
    # that value is not the operator's choice.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    return folder


def _fallback_folder() -> Path:
    """One folder per user under the system's temporary folder, kept across this machine's
    worker restarts (a crash loop must not fill the disk with a cache per start); a new
    private one where that name is someone else's."""
    folder = Path(tempfile.gettempdir()) / f"easel-compile-cache-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            raise PermissionError(f"{folder} is not this user's")
        return folder
    except OSError:
        return Path(tempfile.mkdtemp(prefix="easel-compile-cache-"))


def artifacts_path(folder: Path, device: torch.device, family: str) -> Path:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{family}-torch{torch.__version__}-{name}").strip("-")
    return folder / f"mega-cache-{tag}.bin"


def load_artifacts(folder: Path, device: torch.device, family: str) -> bool:
    """Pre-fill the compile caches from the family's saved file, if any; True when one was loaded."""
    path = artifacts_path(folder, device, family)
    if not path.exists() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception:  # a stale or torn file only costs a cold compile
        log.warning("compile cache %s unreadable; compiling cold", path, exc_info=True)
        return False
    log.info("compile cache artifacts loaded from %s", path)
    return True


TORN_AFTER_S = 3600  # a temporary file this old was left by a process killed while writing it


def _drop_torn(folder: Path, path: Path) -> None:
    """Delete the temporary files of ``path`` that processes killed mid-write left (each as
    large as the cache); a younger one may be another process's write in progress."""
    for tmp in folder.glob(f".{path.name}.*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > TORN_AFTER_S:
                tmp.unlink()


def save_artifacts(folder: Path, device: torch.device, family: str) -> Path | None:
    """Write what this process compiled to the artifacts file, atomically (a temporary file
    renamed into place), so a worker starting meanwhile never reads half a file."""
    path = artifacts_path(folder, device, family)
    _drop_torn(folder, path)
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return None
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return None
    data = saved[0]
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
    except OSError as e:  # a full or read-only volume: the next start compiles cold, nothing worse
        log.warning("could not save the compile cache to %s: %s", folder, e)
        return None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        log.warning("could not save the compile cache to %s: %s", path, e)
        return None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("compile cache artifacts (%d bytes) saved to %s", len(data), path)
    return path
