"""Loading a family's pipelines once per process and keeping them warm.

Loading goes through ``from_pretrained`` exactly as for a hub checkpoint, so the tiny
test weights and real weights take the same path. Variants of one checkpoint
(text2img, controlnet) are built with ``from_pipe`` and share its modules: no second copy.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves, tree_map

from easel.shared.registry import ModelSpec, Registry
from easel.shared.settings import Settings
from easel.worker.device import pick_device, pick_dtype

log = logging.getLogger("easel.worker.pipelines")


@dataclass
class LoadedModel:
    spec: ModelSpec
    source: str
    pipes: dict[str, object]  # task -> pipeline (shared modules)
    device: torch.device
    dtype: torch.dtype
    load_s: float
    extras: dict[str, object] = field(default_factory=dict)
    vae_tiling_above_px: int = 0  # a call with a larger output tiles its VAE (runner.vae_tiling_for); 0 = never
    compile_s: float = 0.0  # the warm-up calls of a compiled model (its compile)
    # A compiled model's calls (runner.call_key) this process has made: its first call of a new
    # key compiles first, which its time limit allows for and the batching policy ignores.
    calls_made: set[tuple] = field(default_factory=set)


def dtype_kwarg() -> str:
    """The name ``from_pretrained`` / ``from_pipe`` take the dtype by: ``dtype`` where diffusers
    has it (``torch_dtype`` still works there, with a deprecation warning), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _load_kwargs(spec: ModelSpec, dtype: torch.dtype) -> dict:
    kw: dict = {dtype_kwarg(): dtype, "use_safetensors": True}
    if spec.variant:
        kw["variant"] = spec.variant
    if spec.revision:
        kw["revision"] = spec.revision
    return kw


MIRROR_COMPLETE = ".easel-complete"


def _sync_s3_source(source: str, settings: Settings) -> str:
    """An s3:// prefix is mirrored once into the model cache and loaded from there.

    The mirror is downloaded into a temporary folder beside its place and renamed into it
    once whole, with a completion marker inside, so an interrupted download is never taken
    for a checkpoint. A file lock makes the workers of one host download it once."""
    from filelock import FileLock

    from easel.shared.storage import S3Ref, Storage

    ref = S3Ref.parse(source.rstrip("/") + "/")
    target = settings.model_root / "s3" / ref.bucket / ref.key.rstrip("/")
    if (target / MIRROR_COMPLETE).exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / MIRROR_COMPLETE).exists():
            return str(target)  # another worker of this host finished it while we waited
        partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            Storage(settings).download_prefix(source, partial)
            (partial / MIRROR_COMPLETE).write_text(source)
            if target.exists():
                shutil.rmtree(target)  # an incomplete mirror from before
            partial.rename(target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return str(target)


def apply_optimizations(pipe, spec: ModelSpec, device: torch.device) -> None:
    """Switches that belong to one pipeline object (its attention processors, device)."""
    opt = spec.optimizations
    pipe.set_progress_bar_config(disable=True)
    # diffusers already uses torch's scaled_dot_product_attention (SDPA) on torch >= 2;
    # sdpa: false puts back the classic processors (for debugging or old kernels).
    if not opt.sdpa and hasattr(getattr(pipe, "unet", None), "set_default_attn_processor"):
        pipe.unet.set_default_attn_processor()
    if opt.attention_slicing and hasattr(pipe, "enable_attention_slicing"):
        pipe.enable_attention_slicing()
    vae = getattr(pipe, "vae", None)
    if opt.vae_tiling and vae is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    if opt.vae_slicing and vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
    if opt.cpu_offload and device.type == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)


def _distinct(pipes: list, attr: str) -> list:
    """The distinct modules named ``attr`` among ``pipes`` (``from_pipe`` variants share them)."""
    found = (getattr(p, attr, None) for p in pipes)
    return list({id(m): m for m in found if isinstance(m, torch.nn.Module)}.values())


def fuse_qkv(pipes: list) -> None:
    """diffusers' fused QKV projections, once per shared UNet/VAE. The UNet fuses unless its
    attention has added KV projections (Kandinsky's), the VAE when it is an AutoencoderKL."""
    from diffusers import AutoencoderKL

    done: set[int] = set()
    for pipe in pipes:
        if not hasattr(pipe, "fuse_qkv_projections") or not hasattr(pipe, "unet"):
            continue
        procs = pipe.unet.attn_processors.values()
        unet_ok = id(pipe.unet) not in done and not any("Added" in type(p).__name__ for p in procs)
        vae_ok = isinstance(getattr(pipe, "vae", None), AutoencoderKL) and id(pipe.vae) not in done
        if unet_ok or vae_ok:
            pipe.fuse_qkv_projections(unet=unet_ok, vae=vae_ok)
            done.update(id(m) for m, ok in ((pipe.unet, unet_ok), (getattr(pipe, "vae", None), vae_ok)) if ok)
        # pipelines sharing modules fused through another one say so too (unfuse_qkv_projections reads it)
        pipe.fusing_unet = id(pipe.unet) in done
        pipe.fusing_vae = id(getattr(pipe, "vae", None)) in done


def channels_last(pipes: list) -> None:
    """NHWC weights for the convolution-heavy modules: cuDNN's tensor-core kernels want them."""
    for attr in ("unet", "vae", "controlnet"):
        for module in _distinct(pipes, attr):
            module.to(memory_format=torch.channels_last)


# Graphs one compiled function may hold. Each variant of a call (batch bucket, input size,
# guidance on or off, ControlNet residuals, a step cache's full and cached passes) is one;
# with fullgraph, torch's default of 8 makes the ninth variant an error that fails its job.
RECOMPILE_LIMIT = 128


# Kinds whose pipelines decode (and encode) in fp32 when an fp16 VAE's config says
# force_upcast (SDXL's VAE overflows in fp16), moving its weights to fp32 and back each call.
VAE_UPCAST_KINDS = frozenset({"sdxl-refiner", "sd-x4-upscaler"})


def upcasts_vae(kind: str, vae) -> bool:
    return kind in VAE_UPCAST_KINDS and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)


def compile_modules(pipes: list, spec: ModelSpec, dynamic_batch: bool = False) -> None:
    """``torch.compile`` (reduce-overhead: CUDA graphs; fullgraph: a graph break is an error,
    not a silent slowdown) each shared UNet's forward and VAE decoder once, for every
    pipeline using it. ``dynamic_batch``: the worker calls them at several batch sizes
    (``_mark_batch_dynamic``)."""
    opt = spec.optimizations
    if opt.compile_unet or opt.compile_vae:
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit,
                                                        4 * RECOMPILE_LIMIT)
    if opt.compile_unet:
        for unet in _distinct(pipes, "unet"):
            unet.forward = _compiled(unet.forward, opt.channels_last, copy_out=True, dynamic_batch=dynamic_batch)
    if opt.compile_vae:
        for vae in _distinct(pipes, "vae"):
            if not hasattr(vae, "decode"):
                continue
            if upcasts_vae(spec.kind, vae):
                log.warning("%s: compile_vae skipped: its pipelines move the VAE to fp32 and back on every call "
                            "(force_upcast), which would record its CUDA graph again each time; an fp16-safe VAE "
                            "with force_upcast false can be compiled", spec.name)
                continue
            vae.decode = _compiled(vae.decode, opt.channels_last, copy_out=False, dynamic_batch=dynamic_batch)


def _mark_batch_dynamic(args: tuple, kwargs: dict) -> None:
    """Trace the batch dimension as a symbol from the first call, on the latents and on every
    input of the latents' batch size (text embeddings, added conditions, ControlNet
    residuals). Left to torch's automatic dynamic shapes, the first bucket compiles a static
    graph and the second a dynamic one: two compiles cold, and two traces on every warm
    restart, where one serves every bucket. Batch 1 keeps a graph of its own (torch
    specializes sizes 0 and 1; ``maybe_mark_dynamic`` lets it)."""
    first = args[0] if args else kwargs.get("sample", kwargs.get("z"))
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or first.shape[0] < 2:
        return
    for x in tree_leaves((args, kwargs)):
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == first.shape[0]:
            torch._dynamo.maybe_mark_dynamic(x, 0)


def _compiled(fn: Callable, channels_last: bool, copy_out: bool, dynamic_batch: bool = False) -> Callable:
    """``fn`` compiled, called with its first argument (latents) in one memory layout and,
    with ``copy_out``, its outputs copied out of its CUDA graph's memory pool.

    One layout: a graph guards on strides, and latents come NHWC from a channels_last VAE's
    encode but NCHW from text2img's noise or a hand-off, so each would compile and record a
    graph of its own, the second on a job. Copied out: the next replay writes over the pool,
    and a scheduler may keep a UNet's raw output across steps (PNDM does, with guidance
    off). Both cost one latent-sized copy at most. ``dynamic_batch``: ``_mark_batch_dynamic``
    on each call."""
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def in_layout(x):
        return x.contiguous(memory_format=layout) if isinstance(x, torch.Tensor) and x.dim() == 4 else x

    def call(*args, **kwargs):  # latents first, or as ``sample=`` (Kandinsky's pipelines) or ``z=``
        if args:
            args = (in_layout(args[0]), *args[1:])
        for name in ("sample", "z"):
            if name in kwargs:
                kwargs[name] = in_layout(kwargs[name])
        if dynamic_batch:
            _mark_batch_dynamic(args, kwargs)
        out = compiled(*args, **kwargs)
        return tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, out) if copy_out else out

    call.__wrapped__ = compiled
    return call


def step_cache(pipes: list, spec: ModelSpec) -> None:
    """DeepCache on each shared UNet; its pass count restarts with each call of any pipeline
    that runs it (worker/stepcache.py)."""
    from easel.worker.stepcache import apply_step_cache

    sc = spec.optimizations.step_cache
    if sc.interval == 1:
        return  # every pass is full: nothing to keep
    for unet in _distinct(pipes, "unet"):
        schedulers = [p.scheduler for p in pipes if getattr(p, "unet", None) is unet and hasattr(p, "scheduler")]
        apply_step_cache(unet, schedulers, sc.interval, sc.branch)


def optimize(pipes: dict[str, object], spec: ModelSpec, device: torch.device, dynamic_batch: bool = False) -> None:
    """All of a model's switches: per pipeline, then once per shared module."""
    distinct = list({id(p): p for p in pipes.values()}.values())
    opt = spec.optimizations
    if opt.fuse_qkv:
        fuse_qkv(distinct)  # before the device move: the fused weights move with the rest
    for p in distinct:
        apply_optimizations(p, spec, device)
    if opt.channels_last:
        channels_last(distinct)
    if opt.step_cache is not None:
        step_cache(distinct, spec)
    compile_modules(distinct, spec, dynamic_batch)


def load_model(spec: ModelSpec, settings: Settings, device: torch.device,
               call_sizes: Sequence[int] = (1,)) -> LoadedModel:
    """``call_sizes``: the images per call the worker will make (``PipelineCache.call_sizes``)."""
    from easel.worker import loaders

    t0 = time.perf_counter()
    source = spec.resolve(spec.source, settings.model_root)
    if source.startswith("s3://"):
        source = _sync_s3_source(source, settings)
    dtype = pick_dtype(spec.dtype, device)
    pipes, extras = loaders.load(spec, source, _load_kwargs(spec, dtype), settings)
    optimize(pipes, spec, device, dynamic_batch=len(call_sizes) > 1)
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s) from %s in %.2fs on %s/%s", spec.name, spec.kind, source, load_s, device, dtype)
    return LoadedModel(spec=spec, source=source, pipes=pipes, device=device, dtype=dtype, load_s=load_s,
                       extras=extras, vae_tiling_above_px=settings.vae_tiling_above_px)


def compiles(spec: ModelSpec) -> bool:
    return spec.optimizations.compile_unet or spec.optimizations.compile_vae


# Kinds a warm-up call can start from an image alone, and the task it runs (the latent
# upscaler encodes an image it is given).
WARM_TASKS = {"sd": "img2img", "sdxl-refiner": "img2img", "kandinsky22": "img2img", "sd-x4-upscaler": "upscale",
              "sd-latent-upscaler": "latent_upscale"}


def native_px(model: LoadedModel) -> int | None:
    """The input side a model was trained for: its UNet's sample size in pixels (None where
    its config leaves the size out). The x4 upscaler's UNet works at its input's pixel
    size, the latent upscaler's at its output's latent size (twice its input's)."""
    from easel.shared.registry import UPSCALE
    from easel.worker.runner import scale_factor

    side = model.pipes[WARM_TASKS[model.spec.kind]].unet.config.sample_size
    if side is None:
        return None
    side = int(side)
    if model.spec.kind == "sd-x4-upscaler":
        return side
    return side * scale_factor(model) // UPSCALE.get(model.spec.kind, 1)


def warm_up(model: LoadedModel, sizes: list[int], batches: list[int] = (1,)) -> float:
    """Run a compiled model once per size and call size (``batches``: the padded micro-batch
    buckets it will be called with) through the runner's own call path (same arguments, so
    the same compiled graphs and CUDA graphs), so the compiles happen now and not on a job.
    Returns seconds."""
    from PIL import Image

    from easel.shared.schema import Stage
    from easel.worker.runner import Carrier, run_stage

    task = WARM_TASKS.get(model.spec.kind)
    if task is None:
        log.info("no warm-up call for kind %s: %s compiles on its first job", model.spec.kind, model.spec.name)
        return 0.0
    if not sizes:
        native = native_px(model)
        if native is None:
            log.warning("%s's UNet config gives no sample size: it compiles on its first job (set "
                        "EASEL_COMPILE_WARM_SIZES to warm it)", model.spec.name)
            return 0.0
        sizes = [native]
    # A step cache's cached passes are a graph of their own: enough steps to reach one.
    cache = model.spec.optimizations.step_cache
    steps = max(3, cache.interval + 1) if cache is not None else 3
    t0 = time.perf_counter()
    for side in sizes:
        stage = Stage(task=task, model=model.spec.name, prompt="warm-up", steps=steps, strength=1.0, seed=0)
        for images in batches:
            run_stage(model, [stage], Carrier(images=[Image.new("RGB", (side, side), (127, 127, 127))]), n=1,
                      want_latent=False, on_step=lambda step, total: True, pad_to=images)
    return time.perf_counter() - t0


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process: each costs a compile on a cold start and a
    trace on a warm one, so the warm-up log says how many it made."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class PipelineCache:
    """All models of one family, loaded at start and kept for the life of the process."""

    def __init__(self, registry: Registry, settings: Settings, family: str, device: torch.device | None = None):
        self.registry = registry
        self.settings = settings
        self.family = family
        self.device = device or pick_device(settings.device)
        self.models: dict[str, LoadedModel] = {}
        self.unloaded: dict[str, str] = {}  # model -> why its last load failed (``get``)

    def warm(self) -> float:
        """Load every model of the family; compiled ones also compile now, from the compile
        cache where an earlier process of this host left one (worker/compile_cache.py)."""
        from easel.worker import compile_cache

        t0 = time.perf_counter()
        specs = self.registry.family_models(self.family)
        folder = compile_cache.cache_dir(self.settings)
        compiled = [s for s in specs if compiles(s)]
        if compiled:
            folder = compile_cache.configure(folder)
            compile_cache.load_artifacts(folder, self.device, self.family)
        for spec in specs:
            self._load_at_start(spec.name)
        if specs and not self.models:  # nothing to serve: fail the start, and jobs wait for a restart
            raise RuntimeError(f"no model of family {self.family!r} could be loaded: {self.unloaded}")
        for spec in compiled:
            if spec.name not in self.models:
                continue
            model = self.models[spec.name]
            sizes, graphs = self.call_sizes(spec), _graphs_compiled()
            model.compile_s = warm_up(model, self.settings.compile_warm_sizes, sizes)
            log.info("compiled %s in %.2fs during warm-up: %d graph(s) at call sizes %s", spec.name,
                     model.compile_s, _graphs_compiled() - graphs, sizes)
        if compiled:
            compile_cache.save_artifacts(folder, self.device, self.family)
        return time.perf_counter() - t0

    def batch_cap(self) -> int:
        """The most jobs one call takes on this worker (``worker.adaptive``)."""
        from easel.worker.adaptive import resolve_batch_size
        from easel.worker.batching import BATCH_KINDS

        s = self.settings
        batchable = any(spec.kind in BATCH_KINDS for spec in self.registry.family_models(self.family))
        return resolve_batch_size(s.batch_size, s.batch_buckets, self.device.type, batchable)

    def call_sizes(self, spec: ModelSpec) -> list[int]:
        """The images per call a model will see: each size a call of 1 to the batch cap jobs
        is padded to (``worker.batching.padded_images``; one image a job), 1 for a kind that
        does not batch."""
        from easel.worker.batching import BATCH_KINDS, padded_images

        if spec.kind not in BATCH_KINDS:
            return [1]
        buckets = self.settings.batch_buckets
        task = WARM_TASKS.get(spec.kind, "img2img")
        return sorted({padded_images(spec, buckets, jobs, task) for jobs in range(1, self.batch_cap() + 1)})

    def _load_at_start(self, name: str) -> None:
        """One model of the family, at start. One that fails to load (weights missing or
        corrupt, its source unreachable) does not keep the family's other models from
        serving: its jobs load it again when they run (``get``), and end as that load's
        error ends them, retried for an outage, failed with the reason otherwise."""
        try:
            self.get(name)
        except Exception:
            log.exception("model %s could not be loaded (%s); the family's other models serve, and its jobs "
                          "try to load it again", name, self.unloaded[name])

    def get(self, name: str) -> LoadedModel:
        if name not in self.models:
            spec = self.registry.get(name)
            if spec.family != self.family:
                raise ValueError(f"model {name!r} belongs to family {spec.family!r}, this worker serves {self.family!r}")
            try:
                self.models[name] = load_model(spec, self.settings, self.device, self.call_sizes(spec))
            except Exception as e:
                first = (str(e).strip().splitlines() or [""])[0]
                self.unloaded[name] = f"{type(e).__name__}: {first}"[:500]
                raise
            self.unloaded.pop(name, None)
        return self.models[name]

