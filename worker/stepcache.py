"""DeepCache-style step caching for a diffusers ``UNet2DConditionModel``.

Between adjacent denoising steps the UNet's deep features barely change (DeepCache, Ma et
al. 2023). On one pass in ``interval`` the whole UNet runs and the outputs of its deep part
are kept: down blocks past ``branch``, the mid block, and the up blocks paired with them.
On the passes between, those blocks hand back their kept outputs and only the shallow
down/up blocks (``down_blocks[:branch + 1]``, ``up_blocks[-(branch + 1):]``) run, fed by
fresh shallow skip connections. The UNet's own forward is unchanged: the skip-connection
bookkeeping stays consistent because a cached block returns exactly what it returned.

Built on diffusers' hook registry (``diffusers.hooks``), which wraps module forwards.
diffusers' own cache hooks (FasterCache, FirstBlockCache, ...) target transformer
denoisers; UNet2DConditionModel has no ``enable_cache``. The PyPI ``DeepCache`` package
(0.1.1) runs on the installed diffusers, but finds the step by looking the timestep up in
``scheduler.timesteps`` (wrong for schedulers that repeat a timestep, e.g. PNDM's PLMS
steps) and keeps its cache from one pipeline call to the next, where the first steps of a
new job could reuse the last job's features. Here the pass count follows the scheduler: it
restarts whenever the pipeline sets its timesteps (once per call) and moves on with each
``scheduler.step`` (once per UNet pass in every pipeline ``worker/loaders.py`` builds; not
in all of diffusers': self-attention guidance, for one, runs the UNet twice a step).

Both happen outside the UNet, so the UNet itself can be compiled (``compile_unet``): the deep
blocks' hooks read one flag, ``StepCacheState.full``, which dynamo guards on, giving two
graphs per input shape (a full pass and a cached one; with CUDA graphs, one capture each),
and the kept outputs keep their keys from call to call so that no other guard changes.
A cached pass's graph reads the kept outputs at fixed addresses: they are copied into one
buffer per block and shape, the same from pass to pass and call to call (fresh copies
would have CUDA graphs record the cached pass again after every full one).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_leaves, tree_map

HOOK = "easel_step_cache"


@dataclass
class StepCacheState:
    """Shared by the deep blocks' hooks and the schedulers' wrappers of one UNet."""

    interval: int
    passes: int = 0  # UNet passes (scheduler steps) in this call
    full_passes: int = 0  # of all passes, full ones (every block ran); kept across calls, for tests and logs
    full: bool = True  # whether the coming pass runs every block
    outputs: dict[str, Any] = field(default_factory=dict)  # deep block -> its kept output (None: none yet)
    buffers: dict[tuple, Any] = field(default_factory=dict)  # (deep block, shapes) -> where outputs are kept

    def reset(self) -> None:
        """A new call: its first pass is a full one, and no pass reads the last call's
        features; the keys stay (a compiled UNet guards on them), and so do the buffers
        (device memory, up to MAX_BUFFERS shapes' worth, for the life of the worker)."""
        self.passes, self.full = 0, True
        self.outputs.update(dict.fromkeys(self.outputs))

    def stepped(self) -> None:
        """A pass ended (the scheduler stepped): the next one is full once in ``interval``.
        A full pass's kept outputs are copied out of the UNet's memory first: with CUDA
        graphs they live in the graph's pool, which the next replay writes over."""
        if self.full:
            self.full_passes += 1
            self.outputs.update({k: self._kept(k, v) for k, v in self.outputs.items()})
        self.passes += 1
        self.full = self.passes % self.interval == 0

    def _kept(self, key: str, out: Any) -> Any:
        """``out`` copied into the buffer of its block and shapes (see the module's note)."""
        if out is None:
            return None
        leaves = tree_leaves(out)
        sig = (key, tuple((t.shape, t.dtype, t.device) for t in leaves if isinstance(t, torch.Tensor)))
        buffer = self.buffers.pop(sig, None)  # put back last: the least recently used go first
        if buffer is None:
            if len(self.buffers) >= MAX_BUFFERS:  # many sizes seen: the least recently used shape's go
                del self.buffers[next(iter(self.buffers))]
            buffer = tree_map(_copy, out)
        else:
            for kept, new in zip(tree_leaves(buffer), leaves):
                if isinstance(kept, torch.Tensor):
                    kept.copy_(new)
        self.buffers[sig] = buffer
        return buffer


# Buffers of kept outputs, over every block and shape (batch bucket x image size) met: a
# bound on their device memory when jobs come in many sizes.
MAX_BUFFERS = 64


def _copy(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


class _DeepBlockHook(ModelHook):
    """Runs a deep block on full passes (keeping its output) and returns the kept output otherwise."""

    def __init__(self, state: StepCacheState, key: str):
        super().__init__()
        self.state, self.key = state, key
        state.outputs[key] = None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.state.full:
            kept = self.state.outputs[self.key]
            if kept is not None:  # always, unless a pipeline ran the UNet without stepping its scheduler
                return kept
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.state.outputs[self.key] = out
        return out


def deep_blocks(unet: torch.nn.Module, branch: int) -> dict[str, torch.nn.Module]:
    """The blocks a cached pass skips: down blocks past ``branch``, the mid block, and the up
    blocks that pair with those down blocks (all but the last ``branch + 1``)."""
    n = len(unet.down_blocks)
    if not 0 <= branch < n - 1:
        raise ValueError(f"step_cache branch {branch} out of range for a UNet of {n} down blocks "
                         f"(0..{n - 2}: at least one block must stay deep)")
    blocks = {f"down_blocks.{i}": unet.down_blocks[i] for i in range(branch + 1, n)}
    if unet.mid_block is not None:
        blocks["mid_block"] = unet.mid_block
    blocks.update({f"up_blocks.{i}": unet.up_blocks[i] for i in range(len(unet.up_blocks) - (branch + 1))})
    return blocks


def apply_step_cache(unet: torch.nn.Module, schedulers: list, interval: int, branch: int) -> StepCacheState:
    """Install step caching on ``unet``; ``schedulers`` (those of the pipelines that run this
    UNet) count its passes. Call before compiling the UNet."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        raise ValueError(f"step_cache needs a UNet with down/mid/up blocks, not {type(unet).__name__}")
    state = StepCacheState(interval=interval)
    for key, block in deep_blocks(unet, branch).items():
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_DeepBlockHook(state, key), HOOK)
    for sched in {id(s): s for s in schedulers}.values():
        _count_passes(sched, state)
    unet._easel_step_cache = state
    return state


def _count_passes(scheduler, state: StepCacheState) -> None:
    """The pipelines easel builds set their scheduler's timesteps once per call, before the
    first UNet pass, and step it once after each pass (tests/test_stepcache.py checks each
    kind): the one place that marks a new call and a pass for any scheduler, outside the
    (maybe compiled) UNet. The pipelines keep the scheduler they were loaded with."""
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)
    def counting_set_timesteps(*args, **kwargs):
        state.reset()
        return set_timesteps(*args, **kwargs)

    @functools.wraps(step)
    def counting_step(*args, **kwargs):
        state.stepped()
        return step(*args, **kwargs)

    scheduler.set_timesteps, scheduler.step = counting_set_timesteps, counting_step
