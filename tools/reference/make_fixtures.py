"""Builds the tiny random-weight models and the diffusers reference dumps the Rust tests compare against.

Run from this folder (nothing reaches for a model hub):

    python3 -m venv V && V/bin/pip install torch==2.15.0 diffusers==0.42.1 transformers==5.23.0 safetensors==0.8.0 accelerate
    HF_HUB_OFFLINE=1 V/bin/python make_fixtures.py ../../tests/fixtures

Versions used for the committed fixtures: torch 2.15.0 (CPU, AVX2 kernels), diffusers 0.42.1,
transformers 5.23.0, safetensors 0.8.0.

The models keep the real diffusers layouts and the constants a single-file checkpoint cannot state
(32 norm groups; SD1: 8 UNet heads; SD2: 64-wide UNet heads; CLIP: 64-wide heads), so the Rust side
infers their configs from tensor shapes exactly as it does for real checkpoints. The CLIP vocabulary is
the real one (49,408 tokens) so real token ids work.

Outputs (under the folder given):
  models/sd1/             diffusers folder; text encoder stored f16, UNet and VAE f32
  models/sd1.safetensors  the same weights as one LDM-named f16 checkpoint (checked with diffusers' own
                          `from_single_file`), plus the extra buffers real checkpoints carry
  models/sd2/             SD2-style: v-prediction, linear projections, gelu CLIP; text encoder bf16
  models/sd2.safetensors  the same as an OpenCLIP-named checkpoint with one more (unused) last CLIP
                          layer, as SD2 takes the penultimate layer
  models/sd1-inpaint/     9-input-channel inpainting UNet with the SD1 text encoder and VAE
  models/taesd/           AutoencoderTiny (TAESD architecture)
  models/vae-wide/        an SD VAE folder (`config.json` + weights, f16) with 64 and 128 channels, so that
                          its 3×3 convolutions at 32² and 64² take the engine's Winograd paths
  reference/*.safetensors and reference/*.json   the dumps
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_DIR = os.path.join(HERE, "..", "..", "assets", "clip")

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "   Café  crème,  naïve   façade  ",
    "東京の夜景、ネオン 🌃 and a 🐱 cat",
    "a (red:1.3) fox, [blurry] background!!! #art @home 100% $5",
    "don't  we'll they're I'm you've it's",
    " ".join(["a detailed oil painting of a lighthouse on a cliff at sunset"] * 8),
]


# ---------------------------------------------------------------------------------------------------
# tiny models


def clip_config(act, layers):
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=64,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def sd1_unet(in_channels=4):
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=2,
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def sd2_unet():
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 64),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=(1, 1),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    )


def vae():
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )


def wide_vae():
    """Wide enough for the engine's Winograd convolutions (F(4×4) at 32² and 64² with 64 and 128
    channels), which the 32-channel fixtures never reach."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(64, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )


def taesd():
    return AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        act_fn="relu",
        latent_channels=4,
        upsampling_scaling_factor=2,
        num_encoder_blocks=(1, 2, 2, 2),
        num_decoder_blocks=(2, 2, 2, 1),
        latent_magnitude=3,
        latent_shift=0.5,
        scaling_factor=1.0,
    )


def randomize(model, *round_to):
    """Perturbs norm parameters (default ones/zeros would hide a swapped weight and bias) and rounds every
    weight through the storage precisions, so checkpoints stored in f16 or bf16 hold exactly the f32
    values (rounding to f16 and then bf16 leaves values both formats represent)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            for dtype in round_to:
                p.copy_(p.to(dtype).float())
    return model.eval()


def save_pipeline(pipe, path, dtypes):
    """save_pretrained with some components stored in half precision, as published folders often are."""
    for name, dtype in dtypes.items():
        getattr(pipe, name).to(dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    for name in dtypes:
        getattr(pipe, name).to(torch.float32)


def tokenizer(pad_token):
    return CLIPTokenizer.from_pretrained(VOCAB_DIR, local_files_only=True, model_max_length=77, pad_token=pad_token)


# ---------------------------------------------------------------------------------------------------
# diffusers -> LDM names, the inverse of diffusers' own single-file converter; checked against it below


RESNET_TO_LDM = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
]


def unet_to_ldm(sd, config):
    per_level = config["layers_per_block"] + 1
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "time_embedding":
            new = {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[parts[1]] + "." + ".".join(parts[2:])
        elif parts[0] == "conv_in":
            new = "input_blocks.0.0." + parts[1]
        elif parts[0] == "conv_norm_out":
            new = "out.0." + parts[1]
        elif parts[0] == "conv_out":
            new = "out.2." + parts[1]
        elif parts[0] == "down_blocks":
            level = int(parts[1])
            if parts[2] == "downsamplers":
                new = f"input_blocks.{(level + 1) * per_level}.0.op." + ".".join(parts[5:])
            else:
                index = level * per_level + int(parts[3]) + 1
                slot = 0 if parts[2] == "resnets" else 1
                new = f"input_blocks.{index}.{slot}." + resnet_rest(parts[2], parts[4:])
        elif parts[0] == "mid_block":
            slot = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(parts[1], parts[2])]
            new = f"middle_block.{slot}." + resnet_rest(parts[1], parts[3:])
        elif parts[0] == "up_blocks":
            level = int(parts[1])
            if parts[2] == "upsamplers":
                has_attention = config["up_block_types"][level].startswith("CrossAttn")
                new = f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attention else 1}.conv." + parts[-1]
            else:
                index = level * per_level + int(parts[3])
                slot = 0 if parts[2] == "resnets" else 1
                new = f"output_blocks.{index}.{slot}." + resnet_rest(parts[2], parts[4:])
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def resnet_rest(kind, rest):
    rest = ".".join(rest)
    if kind == "resnets":
        for ours, ldm in RESNET_TO_LDM:
            if rest.startswith(ours + "."):
                return ldm + rest[len(ours) :]
    return rest


VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(sd, config):
    levels = len(config["block_out_channels"])
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        side = parts[0]
        if parts[1] in ("conv_in", "conv_out"):
            new = key
        elif parts[0] in ("quant_conv", "post_quant_conv"):
            new = key
        elif parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[2]}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:]).replace("conv_shortcut", "nin_shortcut")
            else:
                layer = VAE_ATTN_TO_LDM[parts[4]]
                new = f"{side}.mid.attn_1.{layer}.{parts[-1]}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        elif parts[1] in ("down_blocks", "up_blocks"):
            level = int(parts[2]) if side == "encoder" else levels - 1 - int(parts[2])
            name = "down" if side == "encoder" else "up"
            if parts[3] == "resnets":
                rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{name}.{level}.block.{parts[4]}.{rest}"
            else:
                new = f"{side}.{name}.{level}.{'downsample' if side == 'encoder' else 'upsample'}.conv.{parts[-1]}"
        else:
            raise KeyError(key)
        out["first_stage_model." + new] = value
    return out


def classic_clip_keys(sd):
    """CLIP weights under their classic `text_model.` names: what every published SD checkpoint uses
    (transformers >= 5.6 saves them without the prefix)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in sd.items()}


def clip_to_ldm(sd):
    out = {"cond_stage_model.transformer." + k: v for k, v in classic_clip_keys(sd).items()}
    # Real SD1 checkpoints carry this int64 buffer; loaders must ignore it.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def clip_to_open_clip(sd, layers, extra_layer_source):
    """OpenCLIP names (SD2 single files): fused q/k/v, `resblocks`, plus one more final layer."""
    p = "cond_stage_model.model."
    sd = classic_clip_keys(sd)
    extra_layer_source = classic_clip_keys(extra_layer_source)
    out = {
        p + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        p + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        p + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        p + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        p + "text_projection": torch.randn(64, 64),
        p + "logit_scale": torch.tensor(4.6052),
    }
    for i in range(layers + 1):
        src = sd if i < layers else extra_layer_source
        j = i if i < layers else 0
        h = f"text_model.encoder.layers.{j}."
        r = f"{p}transformer.resblocks.{i}."
        out[r + "ln_1.weight"] = src[h + "layer_norm1.weight"]
        out[r + "ln_1.bias"] = src[h + "layer_norm1.bias"]
        out[r + "attn.in_proj_weight"] = torch.cat([src[h + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[r + "attn.in_proj_bias"] = torch.cat([src[h + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        out[r + "attn.out_proj.weight"] = src[h + "self_attn.out_proj.weight"]
        out[r + "attn.out_proj.bias"] = src[h + "self_attn.out_proj.bias"]
        out[r + "ln_2.weight"] = src[h + "layer_norm2.weight"]
        out[r + "ln_2.bias"] = src[h + "layer_norm2.bias"]
        out[r + "mlp.c_fc.weight"] = src[h + "mlp.fc1.weight"]
        out[r + "mlp.c_fc.bias"] = src[h + "mlp.fc1.bias"]
        out[r + "mlp.c_proj.weight"] = src[h + "mlp.fc2.weight"]
        out[r + "mlp.c_proj.bias"] = src[h + "mlp.fc2.bias"]
    return out


LDM_EXTRAS = {
    # Buffers of the original LDM training code that real single-file checkpoints carry.
    "alphas_cumprod": torch.linspace(0.9991, 0.0047, 1000),
    "model_ema.decay": torch.tensor(0.9999),
    "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
}


def save_single_file(path, tensors, dtype):
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------
# dumps


def dump(path, tensors):
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, path)


def token_dump(tok):
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        raw = tok(prompt, truncation=False).input_ids
        out.append({"prompt": prompt, "padded": ids, "untruncated": raw})
    return out


def noise_dump():
    cases = [
        (0, [1, 4, 8, 8]),
        (42, [2, 4, 8, 8]),
        (1234, [1, 4, 64, 64]),
        (7, [5]),
        (99, [100]),
        (2**32 + 5, [3, 17]),
        (18446744073709551557, [16]),
    ]
    tensors, meta = {}, []
    for i, (seed, shape) in enumerate(cases):
        g = torch.Generator("cpu").manual_seed(seed)
        tensors[f"case{i}"] = torch.randn(shape, generator=g)
        meta.append({"name": f"case{i}", "seed": seed, "draws": [shape]})
    # One generator drawing several times: the cached second normal of the small-tensor path and the
    # engine's position both carry over, as an ancestral sampler's later draws do.
    draws = [[5], [3], [37], [2, 4, 8, 8], [1]]
    g = torch.Generator("cpu").manual_seed(31337)
    for j, shape in enumerate(draws):
        tensors[f"sequence{j}"] = torch.randn(shape, generator=g)
    meta.append({"name": "sequence", "seed": 31337, "draws": draws})
    return tensors, meta


@torch.no_grad()
def model_dumps(pipe, name, in_channels):
    g = torch.Generator("cpu").manual_seed(100)
    latents = torch.randn(2, in_channels, 8, 8, generator=g)
    context = torch.randn(2, 77, 64, generator=g)
    out = {"latents": latents, "context": context}
    for t in (999.0, 500.5, 1.0):
        key = str(t).replace(".", "_")
        out[f"unet_t{key}"] = pipe.unet(latents, torch.tensor([t, t]), encoder_hidden_states=context).sample
    if in_channels == 4:
        vae_latent = torch.randn(1, 4, 8, 8, generator=g)
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        dist = pipe.vae.encode(image).latent_dist
        out.update(
            {
                "vae_latent": vae_latent,
                "vae_decoded": pipe.vae.decode(vae_latent).sample,
                "vae_image": image,
                "vae_mean": dist.mean,
                "vae_sample_seed7": dist.sample(torch.Generator("cpu").manual_seed(7)),
            }
        )
        text = {}
        for i, prompt in enumerate(PROMPTS[:3]):
            ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            text[f"ids{i}"] = ids.float()
            text[f"embedding{i}"] = pipe.text_encoder(ids)[0]
        out.update(text)
    return out


def main(out_root):
    torch.manual_seed(0)
    models = os.path.join(out_root, "models")
    ref = os.path.join(out_root, "reference")
    for d in (models, ref):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)

    # ---- SD1
    sd1_text = randomize(CLIPTextModel(clip_config("quick_gelu", 2)), torch.float16)
    sd1_vae = randomize(vae(), torch.float16)
    sd1 = StableDiffusionPipeline(
        vae=sd1_vae,
        text_encoder=sd1_text,
        tokenizer=tokenizer("<|endoftext|>"),
        unet=randomize(sd1_unet(), torch.float16),
        scheduler=PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True, steps_offset=1,
            set_alpha_to_one=False,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd1_dir = os.path.join(models, "sd1")
    save_pipeline(sd1, sd1_dir, {"text_encoder": torch.float16, "unet": torch.float16})
    classic_tokenizer_folder(sd1.tokenizer, os.path.join(sd1_dir, "tokenizer"))
    classic_text_encoder_file(os.path.join(sd1_dir, "text_encoder", "model.safetensors"))

    single = {}
    single.update(unet_to_ldm(sd1.unet.state_dict(), sd1.unet.config))
    single.update(vae_to_ldm(sd1.vae.state_dict(), sd1.vae.config))
    single.update(clip_to_ldm(sd1.text_encoder.state_dict()))
    single.update(LDM_EXTRAS)
    sd1_file = os.path.join(models, "sd1.safetensors")
    save_single_file(sd1_file, single, torch.float16)
    check_single_file(sd1_file, sd1_dir, sd1)

    # ---- SD2-style
    both = (torch.float16, torch.bfloat16)
    sd2 = StableDiffusionPipeline(
        vae=randomize(vae(), *both),
        text_encoder=same_weights(CLIPTextModel(clip_config("gelu", 2)), sd1.text_encoder),
        tokenizer=tokenizer("!"),
        unet=randomize(sd2_unet(), *both),
        scheduler=DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
            steps_offset=1, prediction_type="v_prediction",
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd2_dir = os.path.join(models, "sd2")
    save_pipeline(sd2, sd2_dir, {"text_encoder": torch.float16, "unet": torch.bfloat16, "vae": torch.bfloat16})
    # The SD1 weights under an SD2 configuration (gelu): the same file, stored once by git.
    classic_text_encoder_file(os.path.join(sd2_dir, "text_encoder", "model.safetensors"))
    extra = randomize(CLIPTextModel(clip_config("gelu", 1)), *both).state_dict()
    single = {}
    single.update(unet_to_ldm(sd2.unet.state_dict(), sd2.unet.config))
    single.update(vae_to_ldm(sd2.vae.state_dict(), sd2.vae.config))
    single.update(clip_to_open_clip(sd2.text_encoder.state_dict(), 2, extra))
    save_single_file(os.path.join(models, "sd2.safetensors"), single, torch.float16)

    # ---- SD1 inpainting (9 input channels: latents, mask, masked-image latents)
    inpaint = StableDiffusionInpaintPipeline(
        vae=sd1.vae,
        text_encoder=sd1.text_encoder,
        tokenizer=sd1.tokenizer,
        unet=randomize(sd1_unet(in_channels=9), torch.float16),
        scheduler=sd1.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    inpaint_dir = os.path.join(models, "sd1-inpaint")
    save_pipeline(inpaint, inpaint_dir, {"text_encoder": torch.float16, "unet": torch.float16})
    classic_text_encoder_file(os.path.join(inpaint_dir, "text_encoder", "model.safetensors"))
    classic_tokenizer_folder(inpaint.tokenizer, os.path.join(inpaint_dir, "tokenizer"))

    # ---- TAESD
    tiny = randomize(taesd(), torch.bfloat16)
    tiny.to(torch.bfloat16).save_pretrained(os.path.join(models, "taesd"), safe_serialization=True)
    tiny.to(torch.float32)

    # ---- dumps
    tokens = {"sd1": token_dump(sd1.tokenizer), "sd2": token_dump(sd2.tokenizer)}
    with open(os.path.join(ref, "tokens.json"), "w", encoding="utf-8") as f:
        json.dump(tokens, f, ensure_ascii=False, indent=1)
    noise, noise_meta = noise_dump()
    dump(os.path.join(ref, "noise.safetensors"), noise)
    with open(os.path.join(ref, "noise.json"), "w") as f:
        json.dump(noise_meta, f, indent=1)
    dump(os.path.join(ref, "sd1.safetensors"), model_dumps(sd1, "sd1", 4))
    dump(os.path.join(ref, "sd2.safetensors"), model_dumps(sd2, "sd2", 4))
    dump(os.path.join(ref, "sd1_inpaint.safetensors"), model_dumps(inpaint, "sd1-inpaint", 9))
    with torch.no_grad():
        g = torch.Generator("cpu").manual_seed(5)
        latent = torch.randn(1, 4, 8, 8, generator=g)
        image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        dump(
            os.path.join(ref, "taesd.safetensors"),
            {
                "latent": latent,
                "decoded": tiny.decode(latent).sample,
                "image": image,
                "encoded": tiny.encode(image).latents,
            },
        )
    wide_vae_fixture(models, ref)
    print("fixtures written to", out_root)


@torch.no_grad()
def wide_vae_fixture(models, ref):
    """models/vae-wide and reference/vae_wide.safetensors, from their own seed (so they can be made alone:
    `python -c "import make_fixtures as m; m.wide_vae_fixture('../../tests/fixtures/models',
    '../../tests/fixtures/reference')"`)."""
    torch.manual_seed(1)
    model = randomize(wide_vae(), torch.float16)
    model.to(torch.float16).save_pretrained(os.path.join(models, "vae-wide"), safe_serialization=True)
    model.to(torch.float32)
    g = torch.Generator("cpu").manual_seed(11)
    latent = torch.randn(1, 4, 32, 32, generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    dist = model.encode(image).latent_dist
    dump(
        os.path.join(ref, "vae_wide.safetensors"),
        {
            "vae_latent": latent,
            "vae_decoded": model.decode(latent).sample,
            "vae_image": image,
            "vae_mean": dist.mean,
            "vae_sample_seed7": dist.sample(torch.Generator("cpu").manual_seed(7)),
        },
    )


def same_weights(model, source):
    model.load_state_dict(source.state_dict())
    return model.eval()


def classic_tokenizer_folder(tok, path):
    """The tokenizer folder as published SD1.x repositories have it: vocab.json and merges.txt, no
    tokenizer.json."""
    state = json.loads(tok.backend_tokenizer.to_str())
    shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(state["model"]["vocab"], f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**special, "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}, f, indent=2)
    reloaded = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    for prompt in PROMPTS:
        assert reloaded(prompt).input_ids == tok(prompt).input_ids, prompt


def classic_text_encoder_file(path):
    """Rewrites a saved text encoder with the classic `text_model.` key names (see `classic_clip_keys`)."""
    save_file(classic_clip_keys(load_file(path)), path, metadata={"format": "pt"})


def check_single_file(path, config_dir, pipe):
    """diffusers' own converter must read our LDM export back to the very same weights."""
    loaded = StableDiffusionPipeline.from_single_file(
        path, config=config_dir, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    for component in ("unet", "vae", "text_encoder"):
        ours = getattr(pipe, component).state_dict()
        theirs = getattr(loaded, component).state_dict()
        for k, v in ours.items():
            assert k in theirs, f"{component}.{k} missing after diffusers' conversion"
            assert torch.equal(v.float(), theirs[k].float()), f"{component}.{k} differs after diffusers' conversion"
    print("single file verified by diffusers' from_single_file:", path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "tests", "fixtures"))
