"""What a finished job leaves behind: its stage records, images and manifest in storage."""
from __future__ import annotations

import functools
import time
from concurrent.futures import Future, wait
from dataclasses import dataclass

from PIL import Image

from easel.shared.images import encode_image
from easel.shared.registry import registry_name
from easel.shared.schema import Attempt, JobSpec, Manifest, Plan, StageRecord
from easel.shared.storage import job_prefix
from easel.worker.context import WorkerContext, wait_all
from easel.worker.runner import Carrier, controlnet_name, pixel_size


def make_record(ctx: WorkerContext, i: int, spec: JobSpec, plan: Plan, model, carrier: Carrier,
                timings: dict[str, float], want_latent: bool, intermediates: list[str],
                batch_size: int = 1) -> StageRecord:
    stage, last = spec.stages[i], len(spec.stages) - 1
    params = stage.model_dump(exclude={"seed"})
    if stage.task == "controlnet_img2img":  # the weights that ran, not the registry's order on a later day
        params["controlnet"] = controlnet_name(model, stage)
    return StageRecord(
        index=i, task=stage.task, model=stage.model, model_source=model.source,
        model_revision=model.spec.revision, family=model.spec.family, handoff_in=plan.handoffs[i],
        handoff_out="latent" if want_latent else ("image" if i < last else "none"),
        params=params, seeds=[stage.seed + k for k in range(spec.num_images)],
        output_size=pixel_size(model, carrier), timings_s=timings, batch_size=batch_size,
        intermediates=intermediates, worker=ctx.hostname,
    )


@dataclass
class PendingFinish:
    """A job's objects being written (on the I/O pool) and what its final state will say."""

    job_id: str
    outputs: list[str]
    manifest: str
    uploads: list[Future]
    own: dict[int, StageRecord]

    def wait(self) -> None:
        """Until every object is written; an upload error (transient or not) surfaces here,
        before the job can be marked done."""
        wait_all(self.uploads)

    def final_fields(self, last_progress: dict | None) -> dict:
        """What the job's succeeded state carries: outputs, this segment's stage records and
        the last step (progress writes are throttled)."""
        return {"outputs": self.outputs, "manifest": self.manifest, **(last_progress or {}),
                **{f"record:{i}": r.model_dump_json() for i, r in self.own.items()}}


def start_finish(ctx: WorkerContext, job_id: str, spec: JobSpec, carrier: Carrier, own: dict[int, StageRecord], *,
                 created_at: float, started_at: float, only_attempt: Attempt | None = None) -> PendingFinish:
    """Start writing a job's outputs and manifest: each image is encoded and uploaded on the
    I/O pool (PNG encoding releases the GIL) while this thread builds the manifest, whose
    upload follows the images' on the pool. ``own`` holds this segment's stage records; earlier segments' records and
    the attempts are read back in one HMGET (none when the job's one attempt is
    ``only_attempt`` and it has no earlier segments)."""
    fmt, prefix = spec.output.format, job_prefix(job_id)
    keys = [f"{prefix}output/{k}.{fmt}" for k in range(len(carrier.images or []))]

    def encode_and_put(key: str, img: Image.Image) -> str:
        return ctx.storage.put(key, encode_image(img, fmt, spec.output.quality))

    images = [ctx.io.submit(encode_and_put, key, img) for key, img in zip(keys, carrier.images or [])]
    outputs = [ctx.storage.uri(key) for key in keys]
    try:
        earlier = [i for i in range(len(spec.stages)) if i not in own]
        stored, attempts = ctx.store.manifest_reads(job_id, earlier, only_attempt)
        records = sorted([*own.values(), *(StageRecord.model_validate_json(r) for r in stored if r)],
                         key=lambda r: r.index)
        manifest = Manifest(
            job_id=job_id, spec=spec, stages=records, outputs=outputs, created_at=created_at,
            timings_s={"queued": started_at - created_at, "stages": sum(sum(r.timings_s.values()) for r in records),
                       "total": time.time() - created_at},
            easel_version=_version(), versions=_versions(), attempts=attempts,
            registry=registry_name(ctx.settings.models),
        )
    except BaseException:  # the retry this error sends must not meet these uploads still running
        wait(images)
        raise
    manifest_key, body = f"{prefix}manifest.json", manifest.model_dump_json(indent=2).encode()

    def put_manifest_last() -> str:
        # Readers (and S3 event notifications) take a manifest as the sign that the images are
        # there; an image that failed leaves none. No deadlock on the pool: it runs jobs in
        # order, so the images were taken up by other threads before this one waits.
        for image in images:
            image.result()
        return ctx.storage.put(manifest_key, body)

    uploads = [*images, ctx.io.submit(put_manifest_last)]
    return PendingFinish(job_id, outputs, ctx.storage.uri(manifest_key), uploads, own)


@functools.lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("easel")
    except PackageNotFoundError:
        return "dev"


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"diffusers": diffusers.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
