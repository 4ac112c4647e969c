"""Multi-stage chains: the hand-off (latent or image) is chosen by easel and recorded."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from easel.producer.client import SubmitError
from easel.shared.plan import plan_job
from easel.shared.registry import load_registry
from easel.shared.schema import JobSpec


def _img(client, uri):
    return Image.open(io.BytesIO(client.storage.get(uri)))


def _run(client, job, timeout=180):
    job_id = client.submit(job)
    st = client.wait(job_id, timeout=timeout)
    assert st.state.value == "succeeded", st.error
    return job_id, st, client.result(job_id)


def test_img2img_chain_same_family_hands_off_latents_in_one_task(client, sd15_worker, input_png):
    job = {"input": {"image": str(input_png)}, "output": {"keep_intermediates": True},
           "stages": [{"model": "sd15", "prompt": "astronaut", "steps": 4, "seed": 1},
                      {"model": "comic-diffusion", "prompt": "charliebo artstyle", "steps": 4, "seed": 2},
                      {"model": "pixel-art", "prompt": "pixelartstyle", "steps": 4, "seed": 3}]}
    job_id, st, m = _run(client, job)
    assert [s.handoff_in for s in m.stages] == ["image", "latent", "latent"]
    assert [s.handoff_out for s in m.stages] == ["latent", "latent", "none"]
    assert len({s.worker for s in m.stages}) == 1
    _, plan = client.store.load(job_id)
    assert len(plan.segments) == 1  # one task, latents stayed on the device
    assert not client.storage.list(f"jobs/{job_id}/handoff/")
    assert [len(s.intermediates) for s in m.stages] == [1, 1, 0]
    for uri in m.stages[0].intermediates + st.outputs:
        assert _img(client, uri).size == (96, 64)


def test_a_later_stage_resized_gets_an_image_and_keeps_its_size(client, sd15_worker, input_png):
    job = {"input": {"image": str(input_png)},
           "stages": [{"model": "sd15", "prompt": "astronaut", "steps": 2, "seed": 1},
                      {"model": "sd15", "prompt": "astronaut", "steps": 2, "seed": 2, "width": 64, "height": 48}]}
    _, st, m = _run(client, job)
    assert [s.handoff_in for s in m.stages] == ["image", "image"]
    assert _img(client, st.outputs[0]).size == (64, 48)  # a latent hand-off kept the first stage's 96 x 64


def assert_handoffs_dropped(client, job_id: str, within_s: float = 10.0) -> None:
    """The worker deletes a job's hand-offs off its hot path, just after the final state."""
    deadline = time.monotonic() + within_s
    while client.storage.list(f"jobs/{job_id}/handoff/"):
        assert time.monotonic() < deadline, client.storage.list(f"jobs/{job_id}/handoff/")
        time.sleep(0.1)


def test_text2img_then_kandinsky_img2img_hands_off_an_image(client, sd15_worker, family_workers):
    family_workers("kandinsky22")
    job = {"stages": [{"task": "text2img", "model": "sd15", "prompt": "astronaut in a jungle", "steps": 3,
                       "width": 64, "height": 96, "seed": 5},
                      {"model": "kandinsky-2-2", "prompt": "astronaut in a jungle", "steps": 4, "seed": 6}]}
    job_id, st, m = _run(client, job)
    assert [s.handoff_in for s in m.stages] == ["none", "image"]
    assert m.stages[0].family == "sd15" and m.stages[1].family == "kandinsky22"
    assert_handoffs_dropped(client, job_id)  # an image went through storage, deleted once the job ended
    assert _img(client, st.outputs[0]).size == (64, 96)


def test_img2img_latent_upscaler_x4_upscaler_grows_8x(client, sd15_worker, family_workers, tmp_path):
    family_workers("upscalers")
    src = tmp_path / "small.png"
    Image.new("RGB", (32, 32), (10, 120, 200)).save(src)
    job = {"input": {"image": str(src)},
           "stages": [{"model": "sd15", "prompt": "castle", "steps": 3, "seed": 1},
                      {"task": "latent_upscale", "model": "sd-x2-latent-upscaler", "prompt": "castle", "steps": 3,
                       "guidance_scale": 0, "seed": 2},
                      {"task": "upscale", "model": "sd-x4-upscaler", "prompt": "castle", "steps": 3, "seed": 3}]}
    job_id, st, m = _run(client, job)
    # sd15 -> x2 shares the SD VAE latent space: a latent crosses families via storage;
    # the x4 upscaler concatenates pixels with its latents, so it is handed an image.
    assert [s.handoff_in for s in m.stages] == ["image", "latent", "image"]
    assert_handoffs_dropped(client, job_id)
    assert [tuple(s.output_size) for s in m.stages] == [(32, 32), (64, 64), (256, 256)]
    assert _img(client, st.outputs[0]).size == (256, 256)


def test_a_job_too_large_for_its_format_fails_before_any_denoising(client, sd15_worker, input_png, tmp_path):
    """A chain whose upscale would outgrow WebP (16383 px a side) is refused at submission
    where the job tells its sizes, and otherwise fails at its first worker once the input is
    read, naming the stage and what to change: not after the whole run."""
    upscale = {"task": "upscale", "model": "sd-x4-upscaler", "prompt": "castle", "steps": 2}
    sized = {"input": {"image": str(input_png)}, "output": {"format": "webp"},
             "stages": [{"model": "sd15", "prompt": "castle", "steps": 2, "width": 4096, "height": 64}, upscale]}
    with pytest.raises(SubmitError, match=r"stage 1 would output 16384 x 256 px, more than webp holds"):
        client.submit(sized)
    text2img = {"output": {"format": "webp"}, "stages": [
        {"task": "text2img", "model": "sd15", "prompt": "castle", "width": 4096, "height": 64}, upscale]}
    with pytest.raises(SubmitError, match=r"stage 1 would output 16384 x 256 px"):
        client.submit(text2img)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (4096, 16), (90, 60, 30)).save(wide)
    job = {"input": {"image": str(wide)}, "output": {"format": "webp"},
           "stages": [{"model": "sd15", "prompt": "castle", "steps": 2}, upscale]}
    st = client.wait(client.submit(job), timeout=60)
    assert st.state.value == "failed", st
    assert st.error.startswith("stage 1 would output 16384 x 64 px, more than webp holds (16383 px a side)")
    assert st.progress.step == 0  # no stage ran
    assert client.wait(client.submit({**sized, "output": {"format": "png"}, "stages": sized["stages"][:1]}),
                       timeout=120).state.value == "succeeded"


def test_controlnet_img2img_then_style_img2img(client, sd15_worker, input_png, tmp_path):
    depth = tmp_path / "depth.png"
    Image.linear_gradient("L").resize((96, 64)).convert("RGB").save(depth)
    job = {"input": {"image": str(input_png)},
           "stages": [{"task": "controlnet_img2img", "model": "sd15", "controlnet": "depth",
                       "control_image": str(depth), "prompt": "astronaut", "steps": 4, "seed": 1},
                      {"model": "comic-diffusion", "prompt": "elden ring style astronaut", "strength": 0.45,
                       "guidance_scale": 10.5, "negative_prompt": "ugly", "steps": 4, "seed": 2}]}
    _, st, m = _run(client, job)
    assert [s.handoff_in for s in m.stages] == ["image", "latent"]
    assert _img(client, st.outputs[0]).size == (96, 64)
    # The control image changes the result. A stage naming no ControlNet runs the model's
    # first, and its manifest names the one that ran.
    first = {k: v for k, v in job["stages"][0].items() if k != "controlnet"}
    job2 = {**job, "stages": [{**first, "controlnet_conditioning_scale": 0.0}, job["stages"][1]]}
    _, st2, m2 = _run(client, job2)
    assert m.stages[0].params["controlnet"] == m2.stages[0].params["controlnet"] == "depth"
    assert not np.array_equal(np.asarray(_img(client, st.outputs[0])), np.asarray(_img(client, st2.outputs[0])))


def test_sdxl_refiner_stage_after_sd15_gets_an_image(client, sd15_worker, family_workers, input_png):
    family_workers("sdxl-refiner")
    job = {"input": {"image": str(input_png)},
           "stages": [{"model": "sd15", "prompt": "astronaut", "steps": 3, "seed": 1},
                      {"model": "sdxl-refiner", "prompt": "astronaut, detailed", "strength": 0.5, "steps": 4,
                       "negative_prompt": "blurry", "seed": 2}]}
    _, st, m = _run(client, job)
    assert [s.handoff_in for s in m.stages] == ["image", "image"]
    assert _img(client, st.outputs[0]).size == (96, 64)


def test_compel_weighting_changes_the_image(client, sd15_worker, input_png):
    base = {"model": "sd15", "steps": 4, "seed": 9, "negative_prompt": "blurry"}
    outs = []
    for prompt, syntax in [("a red fox", "plain"), ("a (red)+++ fox", "compel"), ("a (red)--- fox", "compel")]:
        _, st, m = _run(client, {"input": {"image": str(input_png)},
                                 "stages": [{**base, "prompt": prompt, "prompt_syntax": syntax}]})
        assert m.stages[0].params["prompt_syntax"] == syntax
        outs.append(np.asarray(_img(client, st.outputs[0])).astype(int))
    assert not np.array_equal(outs[1], outs[2])


@pytest.mark.parametrize("job, message", [
    ({"stages": [{"model": "sd15", "prompt": "x"}]}, "stage 0 (img2img, model 'sd15'): needs an input image"),
    ({"input": {"image": "s3://easel/x.png"},
      "stages": [{"model": "sd15"}, {"task": "latent_upscale", "model": "kandinsky-2-2"}]},
     "stage 1 (latent_upscale, model 'kandinsky-2-2'): model kind 'kandinsky22' cannot run task 'latent_upscale'"),
    ({"input": {"image": "s3://easel/x.png"},
      "stages": [{"model": "kandinsky-2-2"}, {"task": "latent_upscale", "model": "sd-x2-latent-upscaler"}]},
     "stage 1 (latent_upscale, model 'sd-x2-latent-upscaler'): takes latents in latent space 'sd1-vae', "
     "but stage 0 (model 'kandinsky-2-2') produces 'kandinsky-movq'"),
    ({"input": {"image": "s3://easel/x.png"}, "stages": [{"model": "sd15"}, {"model": "nope"}]},
     "stage 1 (img2img, model 'nope'): unknown model 'nope'"),
    ({"input": {"image": "s3://easel/x.png"}, "stages": [{"model": "kandinsky-2-2", "prompt_syntax": "compel"}]},
     "Compel prompt weighting is not available"),
    ({"input": {"image": "s3://easel/x.png"}, "stages": [{"model": "sd15"}, {"task": "text2img", "model": "sd15"}]},
     "stage 1 .*text2img can only be the first stage"),
    ({"input": {"image": "s3://easel/x.png"}, "stages": [{"model": "sd15", "steps": 1}]},
     "img2img runs int(steps x strength) denoising steps, and int(1 x 0.8) is 0"),
    ({"input": {"image": "s3://easel/x.png"}, "stages": [
        {"model": "sd15"}, {"task": "latent_upscale", "model": "sd-x2-latent-upscaler", "width": 64, "height": 64}]},
     "stage 1 (latent_upscale, model 'sd-x2-latent-upscaler'): width and height do not apply"),
])
def test_bad_chains_refused_at_submission_naming_the_stage(client, job, message):
    with pytest.raises(SubmitError, match=message.replace("(", r"\(").replace(")", r"\)")
                       if ".*" not in message else message):
        client.submit(job)


def test_plan_groups_consecutive_family_stages_into_segments():
    reg = load_registry()
    spec = JobSpec.model_validate({"input": {"image": "s3://b/k.png"}, "stages": [
        {"model": "sd15"}, {"model": "comic-diffusion"}, {"task": "latent_upscale", "model": "sd-x2-latent-upscaler"},
        {"task": "upscale", "model": "sd-x4-upscaler"}, {"model": "sd15"}]})
    plan = plan_job(spec, reg)
    assert [(s.family, s.stages, s.handoff_in) for s in plan.segments] == [
        ("sd15", [0, 1], "image"), ("upscalers", [2, 3], "latent"), ("sd15", [4], "image")]
    assert plan.handoffs == ["image", "latent", "latent", "image", "image"]


def test_a_deliverys_work_is_its_unet_passes_times_images_and_latent_area():
    """What fair share charges a tenant for a delivery, in units of an SD 1.5 img2img job's
    denoising at the defaults (48 UNet passes at 512 x 512): the steps each stage denoises
    (int(steps x strength) for img2img), doubled under classifier-free guidance, x images x
    the latent area it denoises at, plus 4 passes for the delivery's fixed costs. An input
    no one has read counts as 512 x 512, one read counts at its size, and sizes follow the
    stages' own; the x4 upscaler
    denoises at its input's pixel size, the x2 latent upscaler at twice its input's latent
    size."""
    from easel.shared.plan import segment_work

    reg = load_registry()
    default = JobSpec.model_validate({"input": {"image": "s3://b/k.png"}, "stages": [{"model": "sd15"}]})
    assert segment_work(default, reg, [0]) == 52 / 48
    spec = JobSpec.model_validate({"input": {"image": "s3://b/k.png"}, "num_images": 3, "stages": [
        {"model": "sd15", "steps": 30, "strength": 0.5},  # 15 steps x 2 (CFG) at 512 x 512: 30 passes
        {"model": "sd15", "steps": 10, "strength": 1.0, "guidance_scale": 1.0, "width": 1024, "height": 512},  # 20
        {"task": "latent_upscale", "model": "sd-x2-latent-upscaler", "steps": 5, "guidance_scale": 0.0},
        {"task": "upscale", "model": "sd-x4-upscaler", "steps": 5, "guidance_scale": 9.0}]})
    plan = plan_job(spec, reg)
    assert [s.stages for s in plan.segments] == [[0, 1], [2, 3]]
    assert segment_work(spec, reg, [0, 1]) == (4 + 3 * (30 + 20)) / 48
    x2 = 5 * (2 * 1024 / 8) * (2 * 512 / 8) / 4096  # at twice its 1024 x 512 input's latent size, in 64 x 64s
    x4 = 10 * 2048 * 1024 / 4096  # its latents as large as its 2048 x 1024 input
    assert segment_work(spec, reg, [2, 3]) == (4 + 3 * (x2 + x4)) / 48
    # Where someone has read what a delivery receives, its size counts, not 512 x 512.
    assert segment_work(default, reg, [0], entering=(1024, 1024)) == (4 + 48 * 4) / 48
    assert segment_work(default, reg, [0], entering=(256, 512)) == (4 + 48 / 2) / 48
    assert segment_work(spec, reg, [2, 3], entering=(1024, 512)) == (4 + 3 * (x2 + x4)) / 48
    assert segment_work(spec, reg, [0, 1], entering=(1024, 1024)) == (4 + 3 * (4 * 30 + 20)) / 48


@pytest.mark.parametrize("sizes, handoffs", [
    ([None, 64], ["image", "image"]),  # a resize of the second stage's input: latents cannot be resized
    ([64, 64], ["image", "latent"]),  # the size it already has
    ([64, None], ["image", "latent"]),
    ([64, "x2", 64], ["image", "latent", "image"]),  # the latent upscaler's output is 128 px, not 64
    ([64, "x2", 128], ["image", "latent", "latent"]),
])
def test_a_stage_that_asks_for_another_size_gets_an_image(sizes, handoffs):
    x2 = {"task": "latent_upscale", "model": "sd-x2-latent-upscaler"}
    stages = [{"model": "sd15"} if px is None else x2 if px == "x2" else {"model": "sd15", "width": px, "height": px}
              for px in sizes]
    spec = JobSpec.model_validate({"input": {"image": "s3://b/k.png"}, "stages": stages})
    assert plan_job(spec, load_registry()).handoffs == handoffs
