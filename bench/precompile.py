"""``python -m bench precompile``: a restarted worker's UNet compile, from torch's caches or ahead of time.

A compiled worker that restarts with a warm compile cache (worker/compile_cache.py) still
runs dynamo again: it traces the UNet's Python code, then finds the compiled graph in
inductor's cache. torch's ahead-of-time path (``torch.compile(...).aot_compile``, then
``save_compiled_function`` / ``torch.compiler.load_compiled_function``; experimental: tried
on torch 2.13) saves the traced function with its guards and compiled graph, so a
restart loads it without tracing. This benchmark measures both on the same UNet, each in
a fresh process as a restarted worker would be:

- ``cold``: eager outputs at each bucket (the reference), then ``torch.compile`` as easel
  compiles the UNet (CUDA graphs, fullgraph, the batch dimension a symbol from 2 up); then
  the same function compiled ahead of time at each bucket no saved function serves yet (a
  batch of 1 has a graph of its own; one symbolic batch serves the rest), and saved.
- ``jit``: torch's mega-cache loaded, then the same ``torch.compile``: the warm restart
  easel does today.
- ``aot``: the saved functions loaded; each call goes to the first whose guards pass.

Headlines: ``precompile_cold_compile_s``, ``precompile_jit_warm_s`` and
``precompile_aot_warm_s``: seconds from the compile's start (the cache or file load
included) until every bucket is ready, that is called twice (CUDA-graph trees run a new
shape once and record its graph on the second call), CUDA synchronized; their ratio
``precompile_aot_speedup``; ``precompile_aot_save_s`` and ``precompile_aot_graphs`` (the
functions saved); on each side the smallest and largest bucket's steady call
(``precompile_{jit,aot}_steady_ms_b<n>``), inductor's ``cudagraph_skips`` (above 0 on a GPU:
the graphs were not used; always 1 on the CPU), and the largest difference from the eager
outputs (``precompile_{jit,aot}_max_abs_diff``). Each child's log is under the run's
``logs/`` folder.

On a GPU: ``--arch sd15 --device cuda`` (fp16, fused QKV and channels_last, as
``profile: throughput``). ``--arch tiny --device cpu --px 64`` runs it on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cuda_sync, headline, log

NEEDS_S3 = False
NEEDS_MODELS = False
MODES = ("cold", "jit", "aot")


def unet_call(unet, sample, timestep, encoder_hidden_states):
    """The UNet call of SD's img2img pipeline. Module-level, with the UNet an argument: an
    ahead-of-time compiled function is saved by reference to the function it traced, and
    diffusers' decorated ``forward`` cannot be found again by name."""
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]


def _inputs(unet, batch: int, latent_px: int, mark: bool = True):
    """Seeded latents, timestep and text embeddings at ``batch``; with ``mark``, the batch
    dimension marked dynamic from 2 up, as easel's compiled wrapper marks it. Not for a
    loaded ahead-of-time function: its graph has the symbol already, and its guards refuse
    a tensor marked at run time but not at its compile."""
    import torch

    g = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, unet.config.in_channels, latent_px, latent_px, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    sample = sample.to(unet.device, unet.dtype).contiguous(memory_format=torch.channels_last)
    text = text.to(unet.device, unet.dtype)
    if mark and batch > 1:
        torch._dynamo.maybe_mark_dynamic(sample, 0)
        torch._dynamo.maybe_mark_dynamic(text, 0)
    return unet, sample, torch.tensor(500, device=unet.device), text


def _load_unet(ckpt: Path, device, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet", torch_dtype=dtype).to(device).eval()
    if device.type == "cuda":
        unet.fuse_qkv_projections()
        unet.to(memory_format=torch.channels_last)
    return unet


def _ready_calls(fn, unet, args, mark: bool = True) -> tuple[float, dict]:
    """(seconds until ``fn`` is ready at every bucket, each bucket's output). Ready means
    called twice per bucket: CUDA-graph trees run a new shape eagerly once and record its
    graph on the second call, and a worker's warm-up pays both."""
    import torch

    t0 = time.perf_counter()
    outs = {}
    with torch.no_grad():
        for b in args.buckets:
            call = _inputs(unet, b, args.px // 8, mark)
            outs[b] = fn(*call).float().cpu()
            fn(*call)
        cuda_sync(unet.device)
    return time.perf_counter() - t0, outs


def _steady_ms(fn, unet, args, mark: bool = True) -> dict:
    """Each bucket's call time once ready, in ms (mean of ``args.reps``)."""
    import torch

    steady = {}
    with torch.no_grad():
        for b in args.buckets:
            call = _inputs(unet, b, args.px // 8, mark)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn(*call)
            cuda_sync(unet.device)
            steady[b] = (time.perf_counter() - t0) / args.reps * 1e3
    return steady


def _aot_dispatch(fns: list):
    """Each call to the first loaded function whose guards pass (checked once: each
    function's own check is turned off)."""
    for fn in fns:
        fn.disable_guard_check()

    def call(*args):
        for fn in fns:
            if fn.guard_check(*args):
                return fn(*args)
        reasons = [str(fn._artifacts.guard_manager.check_verbose(fn.prepare_f_locals(*args))) for fn in fns]
        raise RuntimeError(f"no ahead-of-time compiled function's guards pass for this call: {reasons}")
    return call


# mode="reduce-overhead" (CUDA graphs), as options: torch.compile takes a mode or options, not both
OPTIONS = {"triton.cudagraphs": True}


def _cold(args, unet, folder: Path) -> tuple[dict, dict]:
    import torch

    _, eager = _ready_calls(unet_call, unet, args)
    torch.save(eager, folder / "eager.pt")
    out, outs = _jit(args, unet, folder, load=False)
    (folder / "mega-cache.bin").write_bytes(torch.compiler.save_cache_artifacts()[0])
    try:
        out["aot_save_s"], out["aot_graphs"] = _aot_save(args, unet, folder)
    except Exception as e:  # the JIT figures stand; the AOT child has nothing to load
        log(f"precompile: ahead-of-time compile failed: {e!r}")
        out["aot_error"] = repr(e)
    return out, outs


def _aot_save(args, unet, folder: Path) -> tuple[float, int]:
    """Compile ahead of time at each bucket no function saved so far serves (a batch of 1
    has a graph of its own; one symbolic batch serves the rest, where the guards agree),
    and save each. Returns (seconds, functions saved)."""
    import torch

    if not hasattr(torch.compiler, "load_compiled_function"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.compiler.load_compiled_function")
    t0 = time.perf_counter()
    aot = torch.compile(unet_call, fullgraph=True,
                        options={**OPTIONS, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
    fns: list = []
    with torch.no_grad():
        for b in args.buckets:
            plain = _inputs(unet, b, args.px // 8, mark=False)
            if any(fn.guard_check(*plain) for fn in fns):
                continue
            fn = aot.aot_compile((_inputs(unet, b, args.px // 8), {}))
            fn.save_compiled_function(str(folder / f"aot-{len(fns)}.bin"))
            fns.append(fn)
    return time.perf_counter() - t0, len(fns)


def _jit(args, unet, folder: Path, load: bool = True) -> tuple[dict, dict]:
    import torch

    t0 = time.perf_counter()
    if load:
        torch.compiler.load_cache_artifacts((folder / "mega-cache.bin").read_bytes())
    compiled = torch.compile(unet_call, fullgraph=True, options=OPTIONS)
    load_s = time.perf_counter() - t0
    ready_s, outs = _ready_calls(compiled, unet, args)
    return {"compile_s": load_s + ready_s, "steady_ms": _steady_ms(compiled, unet, args)}, outs


def _aot(args, unet, folder: Path) -> tuple[dict, dict]:
    import torch

    # A loaded function takes its CUDA-graph switch from inductor's global config at load
    # (deserialize_bundled_cache_entry), not from the options it was compiled with.
    torch._inductor.config.triton.cudagraphs = OPTIONS["triton.cudagraphs"]
    t0 = time.perf_counter()
    fns = []
    for path in sorted(folder.glob("aot-*.bin")):
        with open(path, "rb") as fh:
            fns.append(torch.compiler.load_compiled_function(fh))
    load_s = time.perf_counter() - t0
    call = _aot_dispatch(fns)
    ready_s, outs = _ready_calls(call, unet, args, mark=False)
    return {"aot_load_s": load_s, "compile_s": load_s + ready_s,
            "steady_ms": _steady_ms(call, unet, args, mark=False)}, outs


def child(args) -> dict:
    """One fresh process: ``args.child`` is the mode. Its inductor cache is under ``args.folder``."""
    import torch
    from torch._dynamo.utils import counters

    folder, device = Path(args.folder), torch.device(args.device)
    t0 = time.perf_counter()
    unet = _load_unet(Path(args.ckpt), device, torch.float16 if device.type == "cuda" else torch.float32)
    cuda_sync(device)
    load_s = time.perf_counter() - t0
    out, outs = {"cold": _cold, "jit": _jit, "aot": _aot}[args.child](args, unet, folder)
    eager = torch.load(folder / "eager.pt")
    diff = max(float((outs[b] - eager[b]).abs().max()) for b in args.buckets)
    return {"mode": args.child, "load_s": load_s, **out, "max_abs_diff": diff,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def _spawn(mode: str, args, ckpt: Path, folder: Path, logdir: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}
    cmd = [sys.executable, "-m", "bench.precompile", "--child", mode, "--ckpt", str(ckpt), "--folder", str(folder),
           "--device", args.device, "--px", str(args.px), "--buckets", ",".join(map(str, args.buckets)),
           "--reps", str(args.reps)]
    t0 = time.perf_counter()
    logdir.mkdir(parents=True, exist_ok=True)
    with open(logdir / f"precompile-{mode}.log", "w") as err:  # inductor's warnings, e.g. skipped CUDA graphs
        try:
            proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                  timeout=args.child_timeout_s)
        except subprocess.TimeoutExpired:
            log(f"precompile {mode}: no result in {args.child_timeout_s}s")
            return {"mode": mode, "error": f"timed out after {args.child_timeout_s}s"}
    if proc.returncode != 0:
        tail = (logdir / f"precompile-{mode}.log").read_text()[-4000:]
        log(f"precompile {mode} failed:\n{tail}")
        return {"mode": mode, "error": tail.strip().splitlines()[-1] if tail.strip() else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"precompile {mode} in {time.perf_counter() - t0:.1f}s: {result}")
    return result


def run(env, args) -> dict:
    from bench.sd15_arch import bench_checkpoint

    ckpt = bench_checkpoint(args.arch)
    folder = env.tmp / "precompile"
    folder.mkdir(parents=True, exist_ok=True)
    res = {"cold": _spawn("cold", args, ckpt, folder, env.logdir)}
    if "compile_s" in res["cold"]:  # else nothing to start warm from
        res["jit"] = _spawn("jit", args, ckpt, folder, env.logdir)
        if "aot_save_s" in res["cold"]:
            res["aot"] = _spawn("aot", args, ckpt, folder, env.logdir)
    heads = _headlines(res, args.buckets)
    for k, v in heads.items():
        headline(k, v)
    return {"headlines": heads, "details": res}


def _headlines(res: dict, buckets: list[int]) -> dict:
    cold, jit, aot = (res.get(m, {}) for m in MODES)
    heads = {}
    if "compile_s" in cold:
        heads["precompile_cold_compile_s"] = round(cold["compile_s"], 1)
    if "aot_save_s" in cold:
        heads["precompile_aot_save_s"] = round(cold["aot_save_s"], 1)
        heads["precompile_aot_graphs"] = cold["aot_graphs"]
    for name, side in (("jit", jit), ("aot", aot)):
        if "compile_s" in side:
            heads[f"precompile_{name}_warm_s"] = round(side["compile_s"], 2)
            for b in (min(buckets), max(buckets)):
                heads[f"precompile_{name}_steady_ms_b{b}"] = round(side["steady_ms"][str(b)], 2)
            heads[f"precompile_{name}_cudagraph_skips"] = side["cudagraph_skips"]
            heads[f"precompile_{name}_max_abs_diff"] = side["max_abs_diff"]
    if "compile_s" in jit and "compile_s" in aot:
        heads["precompile_aot_speedup"] = round(jit["compile_s"] / aot["compile_s"], 2)
    return heads


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--buckets", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16],
                    help="UNet batch sizes: easel's buckets 1, 2, 4, 8 with guidance (two latents an image)")
    ap.add_argument("--reps", type=int, default=3, help="steady calls timed per bucket")
    ap.add_argument("--child-timeout-s", type=float, default=420, help="the most one fresh process may take")


def main(env, args) -> dict:
    return run(env, args)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_args(ap)
    ap.add_argument("--child", choices=MODES, required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--folder", required=True)
    print(json.dumps(child(ap.parse_args())))
