"""The benchmark's measurements through diffusers, for a side-by-side comparison with `studio bench`:
SD1.5-sized models with random weights, saved and loaded as a diffusers folder, on the CPU with
torch limited to the same number of threads, or with `--device cuda` on an NVIDIA GPU in f16 (as
`studio bench --backend wgpu` holds the models on a GPU that computes in f16). Writes the same JSON
keys `studio bench` does.

    HF_HUB_OFFLINE=1 V/bin/python bench_torch.py --json torch.json [--threads 2] [--size 512] [--device cuda]

Versions: torch 2.15.0, diffusers 0.42.1, transformers 5.23.0 (as make_fixtures.py).
"""

import argparse
import json
import os
import tempfile
import time

import torch

from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = "a photograph of an astronaut riding a horse"
LATENT_RGB = torch.tensor(
    [[0.3444, 0.1385, 0.0670], [0.1247, 0.4027, 0.1494], [-0.3192, 0.2513, 0.2103], [-0.1307, -0.1874, -0.7445]]
)


DEVICE = "cpu"


def peak_rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def timed(f):
    """Seconds `f` takes, the GPU's queued work included."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = f()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def sd15_components():
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        )
    )
    return unet, vae, text


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--scratch", default=tempfile.gettempdir())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    results = {}

    a, b = torch.randn(2048, 2048, device=DEVICE), torch.randn(2048, 2048, device=DEVICE)
    a @ b
    results["matmul_gflops"] = 2 * 2048**3 / min(timed(lambda: a @ b)[0] for _ in range(3)) / 1e9

    folder = os.path.join(args.scratch, "sd15-random-torch")
    unet, vae, text = sd15_components()
    # As loaded: f32 on the CPU, f16 on a GPU.
    bytes_per_weight = torch.finfo(dtype).bits // 8
    results["weights_bytes"] = bytes_per_weight * sum(p.numel() for m in (unet, vae, text) for p in m.parameters())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(os.path.join(HERE, "..", "..", "assets", "clip"), model_max_length=77),
        unet=unet, scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                    timestep_spacing="leading", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    del pipe, unet, vae, text
    # On disk before anything is timed, as in `studio bench`: background writeback of the
    # checkpoint's dirty pages would take a core from the first measurements.
    os.sync()

    reset_peak_rss()
    seconds, pipe = timed(lambda: StableDiffusionPipeline.from_pretrained(
        folder, torch_dtype=dtype, local_files_only=True, safety_checker=None, requires_safety_checker=False
    ).to(DEVICE))
    results["load_seconds"] = seconds
    results["load_peak_rss_bytes"] = peak_rss()
    pipe.set_progress_bar_config(disable=True)

    encode = lambda: pipe.encode_prompt(PROMPT, DEVICE, 1, True, "")
    results["text_encode_first"] = timed(encode)[0]
    results["text_encode"] = timed(encode)[0]
    cond, uncond = encode()
    context = torch.cat([uncond, cond])

    sides = [256] + ([512] if args.size >= 512 else [])
    for side in sides:
        # A guided step as StableDiffusionPipeline runs it: the latent twice, one per context.
        latents = torch.randn(1, 4, side // 8, side // 8, device=DEVICE, dtype=dtype).repeat(2, 1, 1, 1)
        step = lambda: pipe.unet(latents, 500, encoder_hidden_states=context).sample
        results[f"unet_step_{side}_first"] = timed(step)[0]
        results[f"unet_step_{side}"] = timed(step)[0]
    side = sides[-1]
    latent = torch.randn(1, 4, side // 8, side // 8, device=DEVICE, dtype=dtype)
    decode = lambda: pipe.vae.decode(latent).sample
    decode()
    results[f"vae_decode_{side}"] = timed(decode)[0]
    taesd = AutoencoderTiny().eval().to(DEVICE, dtype)
    decode = lambda: taesd.decode(latent).sample
    decode()
    results[f"taesd_decode_{side}"] = timed(decode)[0]
    latent_rgb = LATENT_RGB.to(DEVICE, dtype)
    project = lambda: ((latent[0].permute(1, 2, 0) @ latent_rgb + 1) / 2).clamp(0, 1).mul(255).byte().cpu()
    project()
    results[f"preview_projection_{side}"] = timed(project)[0]

    generate = lambda size, steps: pipe(PROMPT, height=size, width=size, num_inference_steps=steps,
                                        generator=torch.Generator(DEVICE).manual_seed(0))
    results["generate_256_4_steps"] = timed(lambda: generate(256, 4))[0]
    reset_peak_rss()
    results[f"generate_{side}_1_step"] = timed(lambda: generate(side, 1))[0]
    results[f"generate_{side}_peak_rss_bytes"] = peak_rss()

    if DEVICE == "cuda":
        results[f"generate_{side}_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        name = f"torch {torch.__version__} on {torch.cuda.get_device_name()} (f16)"
    else:
        name = f"torch {torch.__version__}"
    report = {"backend": f"torch-{DEVICE}", "device": name, "threads": args.threads, "results": results}
    for name, value in sorted(results.items()):
        print(f"{name:<34} {value:>14.3f}")
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
