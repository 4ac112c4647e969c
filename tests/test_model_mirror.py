"""Checkpoints from s3:// are mirrored whole or not at all, once per host."""
from __future__ import annotations

import threading
from pathlib import Path

from easel.shared.settings import Settings
from easel.shared.storage import Storage
from easel.worker import pipelines


def _upload(storage: Storage, folder: Path, prefix: str) -> int:
    files = [p for p in folder.rglob("*") if p.is_file()]
    for p in files:
        storage.put(f"{prefix}/{p.relative_to(folder)}", p.read_bytes())
    return len(files)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != pipelines.MIRROR_COMPLETE}


def test_an_interrupted_mirror_is_downloaded_again(easel_env, model_root, tmp_path):
    settings = Settings(model_root=tmp_path)
    storage = Storage(settings)
    _upload(storage, model_root / "tiny-sd15", "models/mirror-a")
    source = f"s3://{settings.s3_bucket}/models/mirror-a"
    target = tmp_path / "s3" / settings.s3_bucket / "models" / "mirror-a"
    target.mkdir(parents=True)
    (target / "model_index.json").write_bytes((model_root / "tiny-sd15" / "model_index.json").read_bytes())
    assert pipelines._sync_s3_source(source, settings) == str(target)
    assert (target / pipelines.MIRROR_COMPLETE).exists()
    assert _files(target) == _files(model_root / "tiny-sd15")  # the half mirror was replaced, not trusted


def test_concurrent_workers_on_one_host_download_once(easel_env, model_root, tmp_path, monkeypatch):
    settings = Settings(model_root=tmp_path)
    storage = Storage(settings)
    _upload(storage, model_root / "tiny-sd15", "models/mirror-b")
    source = f"s3://{settings.s3_bucket}/models/mirror-b"
    calls: list[int] = []
    real = Storage.download_prefix

    def counted(self, uri, dest):
        calls.append(1)
        return real(self, uri, dest)

    monkeypatch.setattr(Storage, "download_prefix", counted)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(pipelines._sync_s3_source(source, settings)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(got) == 4 and len(set(got)) == 1 and len(calls) == 1
    assert _files(Path(got[0])) == _files(model_root / "tiny-sd15")
    leftovers = [p.name for p in Path(got[0]).parent.iterdir() if p.name.startswith(".mirror-b.")]
    assert leftovers == []


def test_a_mirror_skips_the_folder_markers_consoles_leave(easel_env, model_root, tmp_path):
    """Consoles' "create folder" leaves zero-byte keys ending in ``/``; they are not files."""
    settings = Settings(model_root=tmp_path)
    storage = Storage(settings)
    _upload(storage, model_root / "tiny-sd15", "models/mirror-c")
    for marker in ("models/mirror-c/", "models/mirror-c/unet/"):
        storage.client.put_object(Bucket=settings.s3_bucket, Key=marker, Body=b"")
    listed = {o["Key"] for o in storage.client.list_objects_v2(Bucket=settings.s3_bucket,
                                                               Prefix="models/mirror-c/")["Contents"]}
    assert "models/mirror-c/unet/" in listed  # the server keeps markers as objects
    got = pipelines._sync_s3_source(f"s3://{settings.s3_bucket}/models/mirror-c", settings)
    assert _files(Path(got)) == _files(model_root / "tiny-sd15")
