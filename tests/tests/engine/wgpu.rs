//! burn-wgpu computes what the CPU backend computes, on one resnet block, one transformer block, a
//! convolution with split sums and attention in blocks of queries, and the tiny SD1 fixture and
//! TAESD in half precision match diffusers (tiny shapes: on machines without a GPU wgpu runs on software
//! Vulkan, which compiles every new kernel shape slowly). Needs a Vulkan driver:
//! `scripts/install-deps.sh` installs Mesa's.

use studio_engine::device::{Backend, select};
use studio_engine::models::gpu_conv;
use studio_engine::models::layers::{self, conv2d, group_norm, normalize};
use studio_engine::models::taesd::TinyLayer;
use studio_engine::models::unet::attention::TransformerConfig;
use studio_engine::models::unet::resnet::ResnetConfig;
use studio_engine::{
    Checkpoint, DType, Device, Distribution, FloatDType, Int, Module, Tensor, load_taesd,
};
use studio_tests::{Reference, assert_close, max_error, model};

fn wgpu() -> Device {
    select(Backend::Wgpu)
        .unwrap_or_else(|e| panic!("{e}; install a Vulkan driver (scripts/install-deps.sh)"))
        .device
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn assert_same(what: &str, gpu: Vec<f32>, cpu: Vec<f32>) {
    assert_within(what, gpu, cpu, 1e-4);
}

/// `max |gpu - cpu| ≤ tolerance · max |cpu|`.
fn assert_within(what: &str, gpu: Vec<f32>, cpu: Vec<f32>, tolerance: f32) {
    let (error, scale) = max_error(&gpu, &cpu);
    assert!(
        error <= tolerance * scale,
        "{what}: wgpu differs from flex by {error:e} (scale {scale:e})"
    );
}

#[test]
fn resnet_block_on_wgpu_matches_cpu() {
    let cpu = Device::flex();
    let block = ResnetConfig {
        in_channels: 32,
        out_channels: 64,
        temb_channels: Some(16),
        groups: 32,
        eps: 1e-5,
    }
    .init(&cpu);
    let x = Tensor::<4>::random([1, 32, 8, 8], burn_distribution(), &cpu);
    let temb = Tensor::<2>::random([1, 16], burn_distribution(), &cpu);
    let expected = values(block.forward(x.clone(), Some(&temb)));
    let gpu = wgpu();
    let block = block.to_device(&gpu);
    let actual = values(block.forward(x.to_device(&gpu), Some(&temb.to_device(&gpu))));
    assert_same("resnet block", actual, expected);
}

#[test]
fn transformer_block_on_wgpu_matches_cpu() {
    let cpu = Device::flex();
    let block = TransformerConfig {
        channels: 32,
        heads: 4,
        layers: 1,
        context_dim: 16,
        groups: 32,
        linear_projection: true,
    }
    .init(&cpu);
    let x = Tensor::<4>::random([1, 32, 4, 4], burn_distribution(), &cpu);
    let context = Tensor::<3>::random([1, 5, 16], burn_distribution(), &cpu);
    let expected = values(block.forward(x.clone(), &context));
    let gpu = wgpu();
    let block = block.to_device(&gpu);
    let actual = values(block.forward(x.to_device(&gpu), &context.to_device(&gpu)));
    assert_same("transformer block", actual, expected);
}

/// diffusers itself in f16 lands within 0.2% (UNet) and 0.3% (VAE) of its f32 outputs on this model
/// (`tools/reference/half_precision_error.py`); half a percent leaves room for a different order of
/// summation, not for sums taken in f16 (1.1% on the UNet).
const HALF_TOLERANCE: f32 = 5e-3;

#[test]
fn half_precision_models_on_wgpu_match_diffusers() {
    let gpu = wgpu();
    assert!(
        gpu.supports_dtype(FloatDType::F16),
        "the Vulkan driver cannot compute in f16"
    );
    let models = Checkpoint::open(&model("sd1"))
        .unwrap()
        .with_precision(FloatDType::F16)
        .load_all(&gpu)
        .unwrap();
    for (what, dtype) in [
        ("UNet", models.unet.conv_in.weight.val().dtype()),
        ("VAE", models.vae.decoder.conv_in.weight.val().dtype()),
        (
            "text encoder",
            models.text_encoder.final_layer_norm.gamma.val().dtype(),
        ),
    ] {
        assert_eq!(dtype, DType::F16, "{what} weights");
    }
    let reference = Reference::load("sd1");

    let ids: Vec<i64> = reference
        .get("ids0")
        .values
        .iter()
        .map(|&v| v as i64)
        .collect();
    let ids = Tensor::<1, Int>::from_ints(ids.as_slice(), &gpu).reshape([1, 77]);
    let embedding = models.text_encoder.forward(ids, models.clip_skip);
    let expected = reference.get("embedding0");
    assert_close("f16 text encoder", embedding, expected, HALF_TOLERANCE);

    let latents = reference.get("latents").tensor::<4>(&gpu);
    let context = reference.get("context").tensor::<3>(&gpu);
    let noise = models.unet.forward(latents, &[500.5, 500.5], context);
    let expected = reference.get("unet_t500_5");
    assert_close("f16 UNet", noise, expected, HALF_TOLERANCE);

    let image = models
        .vae
        .decode(reference.get("vae_latent").tensor::<4>(&gpu));
    let expected = reference.get("vae_decoded");
    assert_close("f16 VAE decode", image, expected, HALF_TOLERANCE);
}

#[test]
fn half_precision_taesd_on_wgpu_matches_diffusers() {
    let gpu = wgpu();
    let taesd = load_taesd(&model("taesd"), &gpu, FloatDType::F16).unwrap();
    let weights = match &taesd.decoder.layers[0] {
        TinyLayer::Conv(conv) => conv.weight.val().dtype(),
        _ => panic!("TAESD's decoder starts with a convolution"),
    };
    assert_eq!(weights, DType::F16, "TAESD weights");
    let reference = Reference::load("taesd");
    let decoded = taesd.decode(reference.get("latent").tensor(&gpu));
    assert_eq!(decoded.dtype(), DType::F32, "TAESD returns f32 images");
    assert_close(
        "f16 TAESD decode",
        decoded,
        reference.get("decoded"),
        HALF_TOLERANCE,
    );
    let encoded = taesd.encode(reference.get("image").tensor(&gpu));
    assert_close(
        "f16 TAESD encode",
        encoded,
        reference.get("encoded"),
        HALF_TOLERANCE,
    );
}

#[test]
fn half_precision_group_norm_sums_in_f32() {
    // 16 384 values per group averaging 5: their sum, 82 000, is past f16's largest value.
    let cpu = Device::flex();
    let norm = group_norm(32, 32, 1e-6, &cpu);
    let x = Tensor::<4>::random([1, 32, 128, 128], Distribution::Normal(5.0, 1.0), &cpu);
    let expected = values(normalize(&norm, x.clone(), None, true));
    let gpu = wgpu();
    let half = x.to_device(&gpu).cast(FloatDType::F16);
    let actual = normalize(&norm.to_device(&gpu), half, None, true);
    assert_eq!(actual.dtype(), DType::F16);
    let actual = values(actual.cast(FloatDType::F32));
    assert_within("f16 group norm", actual, expected, HALF_TOLERANCE);
}

#[test]
fn split_convolution_products_on_wgpu_match_cpu() {
    // 64 channels × 9 taps: 576 terms per output, split into 16 parts of 36; in f32, and in f16,
    // where the parts are added in f32.
    let cpu = Device::flex();
    let conv = conv2d([64, 48], 3, 1, 1, true, &cpu);
    let x = Tensor::<4>::random([2, 64, 6, 5], burn_distribution(), &cpu);
    let expected = values(conv.forward(x.clone()));
    let gpu = wgpu();
    let plan = gpu_conv::Plan {
        split_below: usize::MAX,
        min_part: 1,
        ..gpu_conv::GPU
    };
    let conv = conv.to_device(&gpu);
    let x = x.to_device(&gpu);
    let full = gpu_conv::convolve(&conv, x.clone(), &plan).expect("a stride-1 convolution");
    assert_same("split convolution", values(full), expected.clone());
    let mut half_conv = conv.clone();
    half_conv.weight = half_conv.weight.map(|w| w.cast(FloatDType::F16));
    half_conv.bias = half_conv.bias.map(|b| b.map(|b| b.cast(FloatDType::F16)));
    let half = gpu_conv::convolve(&half_conv, x.cast(FloatDType::F16), &plan).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    let half = values(half.cast(FloatDType::F32));
    assert_within("f16 split convolution", half, expected, HALF_TOLERANCE);
}

#[test]
fn attention_in_query_blocks_on_wgpu_matches_cpu() {
    // 2 images × 2 heads × 24 keys: a budget of 10 queries' scores splits 30 queries in 3 blocks.
    let cpu = Device::flex();
    let random = |len| Tensor::<3>::random([2, len, 16], burn_distribution(), &cpu);
    let (q, k, v) = (random(30), random(24), random(24));
    let expected = values(layers::attention_in_query_blocks(
        q.clone(),
        k.clone(),
        v.clone(),
        2,
        false,
        usize::MAX,
    ));
    let gpu = wgpu();
    let actual = values(layers::attention_in_query_blocks(
        q.to_device(&gpu),
        k.to_device(&gpu),
        v.to_device(&gpu),
        2,
        false,
        10 * 2 * 2 * 24,
    ));
    assert_same("attention in query blocks", actual, expected);
}

fn burn_distribution() -> studio_engine::Distribution {
    studio_engine::Distribution::Normal(0.0, 1.0)
}
