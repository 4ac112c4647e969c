"""``python -m bench precompile``: a restarted worker's UNet compile, from torch's caches or ahead of time.

A compiled worker that restarts with a warm compile cache (worker/compile_cache.py) still
runs dynamo again: it traces the UNet's Python code, then finds the compiled graph in
inductor's cache. torch's ahead-of-time path (``torch.compile(...).aot_compile``, then
``save_compiled_function`` / ``torch.compiler.load_compiled_function``; experimental in
torch 2.10-2.14) saves the traced function with its guards and compiled graph, so a
restart loads it without tracing. This benchmark measures both on the same UNet, each in
a fresh process as a restarted worker would be:

- ``cold``: eager outputs at each bucket (the reference), then ``torch.compile`` as easel
  compiles the UNet (reduce-overhead, fullgraph, the batch dimension a symbol from bucket
  2 up), the first call at each bucket timed; torch's mega-cache saved; then the same
  function compiled ahead of time, once per graph (a batch of 1 has its own; a symbolic
  batch serves the rest) (``aot_save_s``), and saved.
- ``jit``: the mega-cache loaded, then the same ``torch.compile``: the warm restart easel
  does today.
- ``aot``: the saved functions loaded and called; each call goes to the first whose
  guards pass.

Headlines (seconds from the compile's start to the last bucket's first result, CUDA
synchronized): ``precompile_cold_compile_s``, ``precompile_jit_warm_s``,
``precompile_aot_warm_s``, their ratio ``precompile_aot_speedup``; the largest bucket's
steady call time on each side (``precompile_{jit,aot}_steady_ms``: an AOT function that
lost its CUDA graphs on the way shows here); and each side's largest difference from the
eager outputs (``precompile_{jit,aot}_max_abs_diff``).

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

from bench.common import headline, log

NEEDS_S3 = False
NEEDS_MODELS = False
MODES = ("cold", "jit", "aot")


def unet_call(unet, sample, timestep, encoder_hidden_states):
    """The UNet call of SD's img2img pipeline. Module-level, with the UNet an argument: an
    ahead-of-time compiled function is saved by reference to the function it traced, and
    diffusers' decorated ``forward`` cannot be found again by name."""
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=None,
                cross_attention_kwargs=None, added_cond_kwargs=None, return_dict=False)[0]


def _inputs(unet, batch: int, latent_px: int, device, dtype, mark: bool = True):
    """Seeded latents, timestep and text embeddings at ``batch``; with ``mark``, the batch
    dimension marked dynamic from 2 up, as easel's compiled wrapper marks it. Not for a
    loaded ahead-of-time function: its graph has the symbol already, and its guards refuse
    a tensor marked at run time but not at its compile."""
    import torch

    g = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, unet.config.in_channels, latent_px, latent_px, generator=g)
    text = torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g)
    sample = sample.to(device, dtype).contiguous(memory_format=torch.channels_last)
    text = text.to(device, dtype)
    if mark and batch > 1:
        torch._dynamo.maybe_mark_dynamic(sample, 0)
        torch._dynamo.maybe_mark_dynamic(text, 0)
    return unet, sample, torch.tensor(500, device=device), text


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _load_unet(ckpt: Path, device, dtype):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ckpt / "unet", torch_dtype=dtype).to(device).eval()
    if device.type == "cuda":
        unet.fuse_qkv_projections()
        unet.to(memory_format=torch.channels_last)
    return unet


def _first_calls(fn, unet, args, mark: bool = True) -> tuple[float, dict, dict]:
    """(seconds to every bucket's first result, each bucket's output, each bucket's steady
    call in ms) of ``fn`` from now."""
    import torch

    device = next(unet.parameters()).device
    t0 = time.perf_counter()
    outs = {}
    with torch.no_grad():
        for b in args.buckets:
            outs[b] = fn(*_inputs(unet, b, args.px // 8, device, unet.dtype, mark)).float().cpu()
        _sync(device)
        first_s = time.perf_counter() - t0
        steady = {}
        for b in args.buckets:
            call = _inputs(unet, b, args.px // 8, device, unet.dtype, mark)
            fn(*call)
            _sync(device)
            t1 = time.perf_counter()
            for _ in range(args.reps):
                fn(*call)
            _sync(device)
            steady[b] = (time.perf_counter() - t1) / args.reps * 1e3
    return first_s, outs, steady


def _graph_sizes(buckets: list[int]) -> list[int]:
    """One batch size per graph a compile makes: 1 (torch specializes it) and the smallest
    above 1 (a symbolic batch serves the rest)."""
    return [b for b in (1, min((x for x in buckets if x > 1), default=0)) if b in buckets]


def _aot_dispatch(fns: list):
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

    _, eager, _ = _first_calls(unet_call, unet, argparse.Namespace(**{**vars(args), "reps": 1}))
    torch.save(eager, folder / "eager.pt")
    out, outs = _jit(args, unet, folder, load=False)
    (folder / "mega-cache.bin").write_bytes(torch.compiler.save_cache_artifacts()[0])
    t0 = time.perf_counter()
    aot = torch.compile(unet_call, fullgraph=True,
                        options={**OPTIONS, "guard_filter_fn": torch.compiler.keep_portable_guards_unsafe})
    with torch.no_grad():
        for i, b in enumerate(_graph_sizes(args.buckets)):
            call = _inputs(unet, b, args.px // 8, unet.device, unet.dtype)
            aot.aot_compile((call, {})).save_compiled_function(str(folder / f"aot-{i}.bin"))
    out["aot_save_s"] = time.perf_counter() - t0
    return out, outs


def _jit(args, unet, folder: Path, load: bool = True) -> tuple[dict, dict]:
    import torch

    t0 = time.perf_counter()
    if load:
        torch.compiler.load_cache_artifacts((folder / "mega-cache.bin").read_bytes())
    compiled = torch.compile(unet_call, fullgraph=True, options=OPTIONS)
    _, outs, steady = _first_calls(compiled, unet, args)
    return {"compile_s": time.perf_counter() - t0, "steady_ms": steady}, outs


def _aot(args, unet, folder: Path) -> tuple[dict, dict]:
    import torch

    t0 = time.perf_counter()
    fns = []
    for path in sorted(folder.glob("aot-*.bin")):
        with open(path, "rb") as fh:
            fns.append(torch.compiler.load_compiled_function(fh))
    load_s = time.perf_counter() - t0
    first_s, outs, steady = _first_calls(_aot_dispatch(fns), unet, args, mark=False)
    return {"aot_load_s": load_s, "compile_s": load_s + first_s, "steady_ms": steady}, outs


def child(args) -> dict:
    """One fresh process: ``args.child`` is the mode. Its inductor cache is under ``args.folder``."""
    import torch

    folder, device = Path(args.folder), torch.device(args.device)
    t0 = time.perf_counter()
    unet = _load_unet(Path(args.ckpt), device, torch.float16 if device.type == "cuda" else torch.float32)
    _sync(device)
    load_s = time.perf_counter() - t0
    out, outs = {"cold": _cold, "jit": _jit, "aot": _aot}[args.child](args, unet, folder)
    eager = torch.load(folder / "eager.pt")
    diff = max(float((outs[b] - eager[b]).abs().max()) for b in args.buckets)
    return {"mode": args.child, "load_s": load_s, **out, "max_abs_diff": diff}


def _spawn(mode: str, args, ckpt: Path, folder: Path) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor"), "TRITON_CACHE_DIR": str(folder / "triton")}
    cmd = [sys.executable, "-m", "bench.precompile", "--child", mode, "--ckpt", str(ckpt), "--folder", str(folder),
           "--device", args.device, "--px", str(args.px), "--buckets", ",".join(map(str, args.buckets)),
           "--reps", str(args.reps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"precompile {mode} failed:\n{proc.stderr[-4000:]}")
        return {"mode": mode, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"precompile {mode} in {time.perf_counter() - t0:.1f}s: {result}")
    return result


def run(env, args) -> dict:
    from bench.sd15_arch import bench_checkpoint

    ckpt = bench_checkpoint(args.arch)
    folder = env.tmp / "precompile"
    folder.mkdir(parents=True, exist_ok=True)
    res = {m: _spawn(m, args, ckpt, folder) for m in MODES}
    cold, jit, aot = (res[m] for m in MODES)
    heads = {}
    if "compile_s" in cold:
        heads["precompile_cold_compile_s"] = round(cold["compile_s"], 1)
        heads["precompile_aot_save_s"] = round(cold["aot_save_s"], 1)
    top = str(max(args.buckets))
    for name, side in (("jit", jit), ("aot", aot)):
        if "compile_s" in side:
            heads[f"precompile_{name}_warm_s"] = round(side["compile_s"], 2)
            heads[f"precompile_{name}_steady_ms"] = round(side["steady_ms"][top], 2)
            heads[f"precompile_{name}_max_abs_diff"] = side["max_abs_diff"]
    if "compile_s" in jit and "compile_s" in aot:
        heads["precompile_aot_speedup"] = round(jit["compile_s"] / aot["compile_s"], 2)
    for k, v in heads.items():
        headline(k, v)
    return {"headlines": heads, "details": res}


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--arch", choices=("sd15", "tiny"), default="sd15")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--buckets", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 8, 16],
                    help="UNet batch sizes: easel's buckets 1, 2, 4, 8 with guidance (two latents an image)")
    ap.add_argument("--reps", type=int, default=5, help="steady calls timed per bucket")


def main(env, args) -> dict:
    return run(env, args)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    add_args(ap)
    ap.add_argument("--child", choices=MODES, required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--folder", required=True)
    print(json.dumps(child(ap.parse_args())))
