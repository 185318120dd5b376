"""How far diffusers' own half-precision UNet and VAE land from its f32 outputs on the tiny SD1 test
model: the yardstick for the engine's f16 tolerance (tests/tests/engine/wgpu.rs).

    HF_HUB_OFFLINE=1 python tools/reference/half_precision_error.py
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def relative_error(actual, expected):
    """Largest absolute difference over the reference's largest magnitude."""
    return ((actual.float() - expected).abs().max() / expected.abs().max()).item()


def main():
    ref = load_file(FIXTURES / "reference" / "sd1.safetensors")
    model = FIXTURES / "models" / "sd1"
    half = torch.float16
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=half)
        t = torch.tensor([500.5, 500.5])
        out = unet(ref["latents"].to(half), t, encoder_hidden_states=ref["context"].to(half)).sample
        print(f"UNet in f16: {relative_error(out, ref['unet_t500_5']):.2e}")
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=half)
        image = vae.decode(ref["vae_latent"].to(half)).sample
        print(f"VAE decode in f16: {relative_error(image, ref['vae_decoded']):.2e}")


if __name__ == "__main__":
    main()
