"""DeepCache-style step caching for a diffusers ``UNet2DConditionModel``.

Between adjacent denoising steps the UNet's deep features barely change (DeepCache, Ma et
al. 2023). On one pass in ``interval`` the whole UNet runs and the outputs of its deep part
are kept: down blocks past ``branch``, the mid block, and the up blocks paired with them.
On the passes between, those blocks hand back their kept outputs and only the shallow
down/up blocks (``down_blocks[:branch + 1]``, ``up_blocks[-(branch + 1):]``) run, fed by
fresh shallow skip connections. The UNet's own forward is unchanged: the skip-connection
bookkeeping stays consistent because a cached block returns exactly what it returned.

Built on diffusers' hook registry (``diffusers.hooks``), which wraps module forwards and
can remove the wrappers again. diffusers' own cache hooks (FasterCache, FirstBlockCache,
...) target transformer denoisers; UNet2DConditionModel has no ``enable_cache``. The PyPI
``DeepCache`` package (0.1.1) runs on the installed diffusers, but finds the step by
looking the timestep up in ``scheduler.timesteps`` (wrong for schedulers that repeat a
timestep, e.g. PNDM's PLMS steps) and keeps its cache from one pipeline call to the next,
where the first steps of a new job could reuse the last job's features. Here a pass counter
restarts whenever the pipeline sets its scheduler's timesteps (once per call), and a change
of input shape always forces a full pass.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK = "easel_step_cache"


@dataclass
class StepCacheState:
    """Shared by the UNet's hook and its deep blocks' hooks for one pipeline call."""

    interval: int
    passes: int = 0  # UNet passes in this call
    full_passes: int = 0  # of them, full ones (every block ran); kept across calls, for tests and logs
    full: bool = True
    shape: tuple | None = None
    outputs: dict[str, Any] = field(default_factory=dict)

    def reset(self) -> None:
        self.passes, self.full, self.shape = 0, True, None
        self.outputs.clear()  # drop the last call's features now: they are device memory


class _UNetHook(ModelHook):
    """Decides, before each UNet pass, whether this pass is a full one."""

    _is_stateful = True

    def __init__(self, state: StepCacheState):
        super().__init__()
        self.state = state

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        st = self.state
        sample = args[0] if args else kwargs["sample"]
        st.full = st.passes % st.interval == 0 or tuple(sample.shape) != st.shape or not st.outputs
        if st.full:
            st.shape = tuple(sample.shape)
            st.full_passes += 1
        st.passes += 1
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


class _DeepBlockHook(ModelHook):
    """Runs a deep block on full passes (keeping its output) and returns the kept output otherwise."""

    def __init__(self, state: StepCacheState, key: str):
        super().__init__()
        self.state, self.key = state, key

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.state.full:
            return self.state.outputs[self.key]
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
    """Install step caching on ``unet``; each of ``schedulers`` (those of the pipelines that
    run this UNet) restarts the pass count when a pipeline call sets its timesteps."""
    if not all(hasattr(unet, a) for a in ("down_blocks", "mid_block", "up_blocks")):
        raise ValueError(f"step_cache needs a UNet with down/mid/up blocks, not {type(unet).__name__}")
    state = StepCacheState(interval=interval)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(_UNetHook(state), HOOK)
    for key, block in deep_blocks(unet, branch).items():
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_DeepBlockHook(state, key), HOOK)
    HookRegistry.check_if_exists_or_initialize(unet).invalidate_child_registries_cache()
    for sched in {id(s): s for s in schedulers}.values():
        _reset_on_set_timesteps(sched, state)
    unet._easel_step_cache = state
    return state


def remove_step_cache(unet: torch.nn.Module) -> None:
    """Take the hooks off again (the UNet then runs every block on every pass)."""
    HookRegistry.check_if_exists_or_initialize(unet).remove_hook(HOOK, recurse=True)
    state = getattr(unet, "_easel_step_cache", None)
    if state is not None:
        state.reset()
        state.interval = 1  # a scheduler still wired to it resets a state nothing reads


def _reset_on_set_timesteps(scheduler, state: StepCacheState) -> None:
    """Every diffusers pipeline sets its scheduler's timesteps once per call, before its first
    UNet pass: the one place that marks a new call for any pipeline and any scheduler."""
    inner = scheduler.set_timesteps

    @functools.wraps(inner)
    def set_timesteps(*args, **kwargs):
        state.reset()
        return inner(*args, **kwargs)

    scheduler.set_timesteps = set_timesteps
