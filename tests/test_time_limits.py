"""Stage time limits fit the work: the cost model counts the latent area each kind's UNet
denoises, a healthy stage runs past the cost model's guess at its own pace, and a stage
that stalls is still failed with a reason that says what was expected and measured."""
from __future__ import annotations

import signal
import time

import pytest
import torch
from PIL import Image

from easel.shared.registry import load_registry
from easel.shared.schema import Stage
from easel.shared.settings import Settings
from tests.conftest import WorkerProc, png_bytes
from easel.worker.pipelines import load_model
from easel.worker.runner import BUILDERS, Carrier, call_params, denoised_area, generators
from easel.worker.watchdog import StageBudget, cost_limit_s

# registry model, task, input side (the seed guide's sizes; the x4 upscaler's input smaller
# to keep the suite short: its cost is linear in the area)
KINDS = [("sd15", "img2img", 256), ("sdxl-refiner", "img2img", 256), ("kandinsky-2-2", "img2img", 256),
         ("sd-x2-latent-upscaler", "latent_upscale", 256), ("sd-x4-upscaler", "upscale", 128)]


def _call(model, name: str, task: str, px: int, steps: int) -> tuple[float, tuple[int, ...]]:
    """One pipeline call of ``steps`` steps: its seconds, and the shape of the latents its UNet denoised."""
    stage = Stage(model=name, task=task, prompt="a castle", steps=steps, seed=1, guidance_scale=0.0,
                  **({"strength": 1.0} if task == "img2img" else {}))
    pipe, kw = BUILDERS[model.spec.kind](model, [stage], Carrier(images=[Image.new("RGB", (px, px), (9, 99, 199))]),
                                         1, None)
    seen: list[tuple[int, ...]] = []

    def cb(p, step, timestep, kwargs):
        seen.append(tuple(kwargs["latents"].shape))
        return kwargs

    if "callback_on_step_end" in call_params(type(pipe)):
        kw.update(callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"])
    else:  # the latent upscaler has only the old-style callback
        kw.update(callback=lambda step, timestep, latents: seen.append(tuple(latents.shape)), callback_steps=1)
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe(**kw, generator=generators([1]), num_inference_steps=steps, output_type="pil")
    return time.perf_counter() - t0, seen[-1]


@pytest.mark.parametrize("name,task,px", KINDS)
def test_each_kinds_limit_comes_from_the_latent_area_its_unet_denoises(model_root, name, task, px):
    model = load_model(load_registry().get(name), Settings(model_root=model_root), torch.device("cpu"))
    _, shape = _call(model, name, task, px, 2)
    passes = 2 if name == "kandinsky-2-2" else 1  # the prior's step and the decoder's
    assert denoised_area(model, px, px) == passes * shape[-1] * shape[-2]
    # One step's real cost on these tiny checkpoints (six steps less two, over four; best of
    # three each) is inside the default per-step allowance, without the base.
    step_s = (min(_call(model, name, task, px, 6)[0] for _ in range(3)) -
              min(_call(model, name, task, px, 2)[0] for _ in range(3))) / 4
    per_step = cost_limit_s(0.0, Settings().stage_timeout_per_mpx_step_s, 1, denoised_area(model, px, px), 1)
    assert per_step >= step_s, (name, per_step, step_s)


def test_the_budget_follows_the_measured_pace():
    budget = StageBudget(cost_s=2.0, cap_s=100.0, slack=3.0, started=0.0)
    assert budget.deadline == 2.0
    for k, now in enumerate([0.5, 1.0, 1.5, 2.0]):
        fixed = budget.step(now, total=40)
        assert fixed == (k == 3)
    # prologue 0.5 s, 0.5 s a step: 2 x 0.5 + 40 x 0.5 = 21 s projected, 63 s allowed
    assert (budget.pace_s, budget.projected_s, budget.deadline) == (0.5, 21.0, 63.0)
    reason = budget.exceeded("stage 0", 30, 40, 64.0)
    assert "time limit of 63.0s" in reason and "expected 0.500s per step" in reason and "measured 64.0s" in reason
    capped = StageBudget(cost_s=2.0, cap_s=10.0, slack=3.0, started=0.0)
    for now in [0.5, 1.0, 1.5, 2.0]:
        capped.step(now, total=40)
    assert capped.deadline == 10.0 and "EASEL_STAGE_TIMEOUT_MAX_S" in capped.exceeded("stage 0", 9, 40, 11.0)


@pytest.mark.slow
def test_seed_guide_upscale_chain_succeeds_on_default_limits(client, sd15_worker, family_workers, tmp_path):
    """img2img at 256 px -> x2 latent upscaler (5 steps) -> x4 upscaler (5 steps): 2048 px."""
    family_workers("upscalers")
    src = tmp_path / "in.png"
    src.write_bytes(png_bytes((256, 256)))
    job = {"input": {"image": str(src)},
           "stages": [{"model": "sd15", "prompt": "an astronaut", "strength": 0.8, "steps": 5, "seed": 1},
                      {"task": "latent_upscale", "model": "sd-x2-latent-upscaler", "prompt": "an astronaut",
                       "steps": 5, "guidance_scale": 0},
                      {"task": "upscale", "model": "sd-x4-upscaler", "prompt": "an astronaut", "steps": 5,
                       "noise_level": 20}]}
    st = client.wait(client.submit(job), timeout=900)
    assert st.state.value == "succeeded", st.error
    assert [tuple(s.output_size) for s in client.result(st.id).stages] == [(256, 256), (512, 512), (2048, 2048)]


@pytest.mark.slow
def test_a_stage_that_stalls_midway_fails_with_the_reason(client, easel_env, tmp_path):
    """The worker process is frozen (SIGSTOP) mid-stage, as a hung device would leave it, for
    longer than its pace allows; once it runs again the stage fails, naming the expected and
    the measured times, and the worker serves the next job."""
    w = WorkerProc("sd15-wide", {**easel_env, "EASEL_STAGE_TIMEOUT_BASE_S": "1"}, tmp_path).start()
    try:
        image = client.storage.put_input(png_bytes((64, 64)), "png")
        stage = {"model": "sd15-wide", "prompt": "stall", "steps": 60, "strength": 1.0, "seed": 1}
        job_id = client.submit({"input": {"image": image}, "stages": [stage]})
        deadline = time.monotonic() + 60
        while client.status(job_id).progress.step < 6:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        w.proc.send_signal(signal.SIGSTOP)
        time.sleep(10)  # under the heartbeat TTL: the worker is not presumed dead
        w.proc.send_signal(signal.SIGCONT)
        st = client.wait(job_id, timeout=60)
        assert st.state.value == "failed", st.error
        assert "exceeded its time limit" in st.error and "per step from its first steps" in st.error
        assert "EASEL_STAGE_TIMEOUT_BASE_S" in st.error
        after = client.submit({"input": {"image": image}, "stages": [{**stage, "steps": 2}]})
        assert client.wait(after, timeout=60).state.value == "succeeded"
    finally:
        w.stop()


@pytest.mark.parametrize("name,task,px", KINDS)
def test_a_stop_ends_every_kinds_call_at_the_next_step(model_root, name, task, px):
    """A step hook that says stop (a cancel, a take-over) ends the call at that step, whether
    the pipeline reads ``_interrupt`` or not (Kandinsky 2.2's loop does not), and leaves the
    shared pipeline ready for the next call."""
    from easel.worker.runner import Interrupted, run_stage

    model = load_model(load_registry().get(name), Settings(model_root=model_root), torch.device("cpu"))
    stage = Stage(model=name, task=task, prompt="a castle", steps=8, seed=1, guidance_scale=0.0,
                  **({"strength": 1.0} if task == "img2img" else {}))
    carrier = Carrier(images=[Image.new("RGB", (px // 2, px // 2), (9, 99, 199))])
    asked: list[int] = []

    def stop_at_two(step: int, total: int) -> bool:
        asked.append(step)
        return step < 2

    with pytest.raises(Interrupted):
        run_stage(model, [stage], carrier, n=1, want_latent=False, on_step=stop_at_two)
    assert asked == [1, 2], asked
    asked.clear()
    out, _ = run_stage(model, [stage], carrier, n=1, want_latent=False, on_step=lambda step, total: True)
    assert len(out.images) == 1


def test_a_disarmed_watchdog_lets_the_calls_jobs_go():
    """What a watch would fail (a call's jobs, with their images or latents) is freed once the
    call is over: an idle worker does not hold its last batch."""
    import gc
    import weakref

    from easel.worker.watchdog import Watchdog

    class Held:
        pass

    held = Held()
    gone = weakref.ref(held)
    dog = Watchdog()
    dog.arm(60, "a stage", lambda reason, jobs=[held]: jobs)
    dog.disarm()
    del held
    gc.collect()
    assert gone() is None
