"""Runs diffusers' Stable Diffusion pipelines on the tiny fixture models and dumps, per case, the
noise levels, the latents after every step and the final image, for the Rust pipeline tests.

    HF_HUB_OFFLINE=1 V/bin/python make_pipeline_dumps.py ../../tests/fixtures

(after make_fixtures.py; same pinned versions: torch 2.15.0, diffusers 0.42.1, transformers 5.23.0).

Writes reference/pipeline/<case>.safetensors (tensors: `sigmas`, `timesteps`, `step<i>` latents after
step i as the scheduler holds them, `image` in [0, 1] as H×W×3) and reference/pipeline/cases.json (the
request of each case). Init image and mask are reference/pipeline/init.png and mask.png.
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

SIZE = 64
PROMPT = "a red fox in the snow"
NEGATIVE = "blurry"
LONG_PROMPT = " ".join(
    ["a very detailed oil painting of an old stone lighthouse standing on a rocky cliff above a stormy sea"] * 6
)

SCHEDULERS = {
    "euler": lambda c, **kw: EulerDiscreteScheduler.from_config(c, **kw),
    "euler_a": lambda c, **kw: EulerAncestralDiscreteScheduler.from_config(c, **kw),
    # Stable Diffusion's configs set clip_sample false; DDIM's own default is true.
    "ddim": lambda c, **kw: DDIMScheduler.from_config(c, clip_sample=False, **kw),
    "dpmpp_2m": lambda c, **kw: DPMSolverMultistepScheduler.from_config(
        c, algorithm_type="dpmsolver++", solver_order=2, **kw
    ),
    "lcm": lambda c, **kw: LCMScheduler.from_config(c, **kw),
}


def scheduler(config, sampler, schedule):
    kw = {}
    if schedule == "karras":
        kw["use_karras_sigmas"] = True
    elif schedule == "trailing":
        kw["timestep_spacing"] = "trailing"
    return SCHEDULERS[sampler](config, **kw)


def init_image():
    image = Image.new("RGB", (SIZE, SIZE))
    pixels = image.load()
    for y in range(SIZE):
        for x in range(SIZE):
            pixels[x, y] = (4 * x, 4 * y, 255 - 2 * (x + y))
    draw = ImageDraw.Draw(image)
    draw.ellipse((12, 10, 44, 42), fill=(240, 200, 40))
    return image


def mask_image():
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((16, 8, 47, 39), fill=255)
    return mask


def chunked_embeddings(pipe, prompt):
    """A1111-style conditioning for prompts past 77 tokens: 75-token chunks, each encoded with start,
    end and padding, concatenated (this prompt has no commas or weights)."""
    tok = pipe.tokenizer
    ids = tok(prompt, truncation=False, add_special_tokens=False).input_ids
    chunks = [ids[i : i + 75] for i in range(0, len(ids), 75)] or [[]]
    out = []
    with torch.no_grad():
        for chunk in chunks:
            padded = [tok.bos_token_id] + chunk + [tok.eos_token_id]
            padded += [tok.pad_token_id] * (77 - len(padded))
            out.append(pipe.text_encoder(torch.tensor([padded]))[0])
    return torch.cat(out, dim=1), len(chunks)


def run(pipe_class, model_dir, case, out_dir):
    pipe = pipe_class.from_pretrained(
        model_dir, local_files_only=True, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = scheduler(pipe.scheduler.config, case["sampler"], case["schedule"])
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(kwargs["latents"].clone())
        return kwargs

    kwargs = dict(
        num_inference_steps=case["steps"],
        guidance_scale=case["cfg_scale"],
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="np",
        callback_on_step_end=callback,
    )
    if case.get("long_prompt"):
        cond, n = chunked_embeddings(pipe, case["prompt"])
        uncond, _ = chunked_embeddings(pipe, case["negative_prompt"])
        uncond = torch.cat([uncond] + [chunked_embeddings(pipe, "")[0]] * (n - uncond.shape[1] // 77), dim=1)
        kwargs.update(prompt_embeds=cond, negative_prompt_embeds=uncond)
        case["chunks"] = n
    else:
        kwargs.update(prompt=case["prompt"], negative_prompt=case["negative_prompt"])
    if pipe_class is StableDiffusionPipeline:
        kwargs.update(height=SIZE, width=SIZE)
    else:
        kwargs.update(image=init_image(), strength=case["strength"])
    if pipe_class is StableDiffusionInpaintPipeline:
        kwargs.update(mask_image=mask_image(), height=SIZE, width=SIZE)
    with torch.no_grad():
        image = pipe(**kwargs).images[0]
    tensors = {f"step{i}": s for i, s in enumerate(steps)}
    tensors["image"] = torch.from_numpy(np.ascontiguousarray(image))
    tensors["timesteps"] = pipe.scheduler.timesteps.float()
    if hasattr(pipe.scheduler, "sigmas"):
        tensors["sigmas"] = torch.as_tensor(pipe.scheduler.sigmas).float()
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, os.path.join(out_dir, case["name"] + ".safetensors"))
    print("dumped", case["name"], "steps:", len(steps))


def main(root):
    models = os.path.join(root, "models")
    out_dir = os.path.join(root, "reference", "pipeline")
    os.makedirs(out_dir, exist_ok=True)
    init_image().save(os.path.join(out_dir, "init.png"))
    mask_image().save(os.path.join(out_dir, "mask.png"))
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, seed=42, steps=4, cfg_scale=7.5, schedule="normal", strength=1.0)
    cases = []

    def add(name, pipe, model, **kw):
        case = dict(base, name=name, mode=pipe, model=model, **kw)
        cases.append(case)

    for sampler, schedules in {
        "euler": ["normal", "karras", "trailing"],
        "euler_a": ["normal", "trailing"],
        "ddim": ["normal", "trailing"],
        "dpmpp_2m": ["normal", "karras", "trailing"],
        "lcm": ["normal"],
    }.items():
        for schedule in schedules:
            add(f"txt2img_{sampler}_{schedule}", "txt2img", "sd1", sampler=sampler, schedule=schedule)
    add("txt2img_euler_no_cfg", "txt2img", "sd1", sampler="euler", cfg_scale=1.0)
    add("txt2img_dpmpp_2m_six_steps", "txt2img", "sd1", sampler="dpmpp_2m", steps=6)
    add("txt2img_long_prompt", "txt2img", "sd1", sampler="euler", prompt=LONG_PROMPT, long_prompt=True)
    add("sd2_vpred_euler", "txt2img", "sd2", sampler="euler")
    add("sd2_vpred_ddim", "txt2img", "sd2", sampler="ddim")
    for sampler in ["euler", "euler_a", "ddim"]:
        add(f"img2img_{sampler}", "img2img", "sd1", sampler=sampler, strength=0.6, steps=5)
    add("inpaint9_euler", "inpaint", "sd1-inpaint", sampler="euler")
    add("inpaint9_euler_a", "inpaint", "sd1-inpaint", sampler="euler_a")
    add("inpaint9_euler_strength", "inpaint", "sd1-inpaint", sampler="euler", strength=0.75)
    add("inpaint4_euler", "inpaint", "sd1", sampler="euler")
    add("inpaint4_ddim_strength", "inpaint", "sd1", sampler="ddim", strength=0.75)

    classes = {
        "txt2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    for case in cases:
        run(classes[case["mode"]], os.path.join(models, case["model"]), case, out_dir)
    with open(os.path.join(out_dir, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures"))
