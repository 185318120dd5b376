//! CLIP, UNet, VAE and TAESD outputs equal diffusers' on the same inputs, for every fixture model
//! and both checkpoint layouts (tolerance: max abs error ≤ 1e-4 × the reference's largest value).

use studio_engine::models::vae::AutoencoderKl;
use studio_engine::noise::TorchRng;
use studio_engine::{Checkpoint, Device, FloatDType, ModelFamily, Tensor, load_taesd, load_vae};
use studio_tests::{Expected, Reference, assert_close, model};

const TOLERANCE: f32 = 1e-4;

fn open(name: &str) -> Checkpoint {
    Checkpoint::open(&model(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn text_encoder_matches(checkpoint: &str, reference: &str) {
    let device = Device::flex();
    let reference = Reference::load(reference);
    let checkpoint = open(checkpoint);
    let (clip, skip) = checkpoint.load_text_encoder(&device).unwrap();
    for i in 0..3 {
        let ids = reference.get(&format!("ids{i}"));
        let ids: Vec<i64> = ids.values.iter().map(|&v| v as i64).collect();
        let input =
            Tensor::<1, studio_engine::Int>::from_ints(ids.as_slice(), &device).reshape([1, 77]);
        let embedding = clip.forward(input, skip);
        assert_close(
            &format!("{} embedding {i}", checkpoint.path().display()),
            embedding,
            reference.get(&format!("embedding{i}")),
            TOLERANCE,
        );
    }
}

fn unet_matches(checkpoint: &str, reference: &str) {
    let device = Device::flex();
    let reference = Reference::load(reference);
    let unet = open(checkpoint).load_unet(&device).unwrap();
    let latents = reference.get("latents").tensor::<4>(&device);
    let context = reference.get("context").tensor::<3>(&device);
    for (t, key) in [
        (999.0, "unet_t999_0"),
        (500.5, "unet_t500_5"),
        (1.0, "unet_t1_0"),
    ] {
        let out = unet.forward(latents.clone(), &[t, t], context.clone());
        assert_close(
            &format!("{checkpoint} UNet at t={t}"),
            out,
            reference.get(key),
            TOLERANCE,
        );
    }
}

/// One latent given with two contexts (classifier-free guidance) runs the layers before the first
/// cross-attention once; the result must equal the UNet run on the latent written out twice, which
/// `unet_matches` holds to diffusers.
fn unet_shares_a_latent(checkpoint: &str, reference: &str) {
    let device = Device::flex();
    let reference = Reference::load(reference);
    let unet = open(checkpoint).load_unet(&device).unwrap();
    let latents = reference.get("latents").tensor::<4>(&device);
    let [_, channels, height, width] = latents.dims();
    let latent = latents.slice([0..1, 0..channels, 0..height, 0..width]);
    let context = reference.get("context").tensor::<3>(&device);
    let twice = Tensor::cat(vec![latent.clone(), latent.clone()], 0);
    let written_out = unet.forward(twice, &[500.5], context.clone());
    let expected = Expected {
        shape: written_out.dims().to_vec(),
        values: written_out.into_data().try_to_vec::<f32>().unwrap(),
    };
    let shared = unet.forward(latent, &[500.5], context);
    assert_close(
        &format!("{checkpoint} UNet with a shared latent"),
        shared,
        &expected,
        TOLERANCE,
    );
}

fn vae_matches(checkpoint: &str, reference: &str) {
    let device = Device::flex();
    let vae = open(checkpoint).load_vae(&device).unwrap();
    vae_matches_reference(&vae, checkpoint, reference, &device);
}

fn vae_matches_reference(vae: &AutoencoderKl, checkpoint: &str, reference: &str, device: &Device) {
    let reference = Reference::load(reference);
    let decoded = vae.decode(reference.get("vae_latent").tensor(device));
    assert_close(
        &format!("{checkpoint} VAE decode"),
        decoded,
        reference.get("vae_decoded"),
        TOLERANCE,
    );
    let distribution = vae.encode(reference.get("vae_image").tensor(device));
    assert_close(
        &format!("{checkpoint} VAE mean"),
        distribution.mean.clone(),
        reference.get("vae_mean"),
        TOLERANCE,
    );
    let sample = distribution.sample(&mut TorchRng::new(7));
    assert_close(
        &format!("{checkpoint} VAE sample"),
        sample,
        reference.get("vae_sample_seed7"),
        TOLERANCE,
    );
}

#[test]
fn families_are_detected_from_headers() {
    for (name, family) in [
        ("sd1", ModelFamily::Sd1),
        ("sd1.safetensors", ModelFamily::Sd1),
        ("sd2", ModelFamily::Sd2),
        ("sd2.safetensors", ModelFamily::Sd2),
        ("sd1-inpaint", ModelFamily::Sd1Inpaint),
    ] {
        assert_eq!(open(name).family(), family, "{name}");
    }
}

#[test]
fn sd1_text_encoder() {
    text_encoder_matches("sd1", "sd1");
}

#[test]
fn sd1_single_file_text_encoder() {
    text_encoder_matches("sd1.safetensors", "sd1");
}

#[test]
fn sd2_text_encoder() {
    text_encoder_matches("sd2", "sd2");
}

#[test]
fn sd2_single_file_text_encoder_uses_the_penultimate_layer() {
    // The file has one more OpenCLIP layer than the folder; SD2 conditions on the one before it.
    text_encoder_matches("sd2.safetensors", "sd2");
}

#[test]
fn sd1_unet() {
    unet_matches("sd1", "sd1");
}

#[test]
fn sd1_single_file_unet() {
    unet_matches("sd1.safetensors", "sd1");
}

#[test]
fn sd1_unet_shares_a_latent_between_guidance_contexts() {
    unet_shares_a_latent("sd1", "sd1");
}

#[test]
fn sd2_unet_shares_a_latent_between_guidance_contexts() {
    unet_shares_a_latent("sd2", "sd2");
}

#[test]
fn sd2_unet_with_linear_projections() {
    unet_matches("sd2", "sd2");
}

#[test]
fn sd2_single_file_unet() {
    unet_matches("sd2.safetensors", "sd2");
}

#[test]
fn sd1_inpainting_unet_with_nine_input_channels() {
    unet_matches("sd1-inpaint", "sd1_inpaint");
}

#[test]
fn sd1_vae() {
    vae_matches("sd1", "sd1");
}

#[test]
fn sd1_single_file_vae() {
    vae_matches("sd1.safetensors", "sd1");
}

#[test]
fn sd2_vae_stored_bf16() {
    vae_matches("sd2", "sd2");
}

#[test]
fn standalone_vae_through_winograd_convolutions() {
    // 64 and 128 channels at 32² and 64²: the 3×3 convolutions run as Winograd F(4×4) products,
    // which the narrow fixtures never reach (F(2×2), for 16² and less with 320 channels and more,
    // is checked against im2col in the engine's unit tests).
    let device = Device::flex();
    let vae = load_vae(&model("vae-wide"), &device).unwrap();
    vae_matches_reference(&vae, "vae-wide", "vae_wide", &device);
}

#[test]
fn single_file_configs_equal_the_folder_configs() {
    for (folder, file) in [("sd1", "sd1.safetensors"), ("sd2", "sd2.safetensors")] {
        let (folder, file) = (open(folder), open(file));
        let (a, b) = (folder.unet_config().unwrap(), file.unet_config().unwrap());
        assert_eq!(a.block_out_channels, b.block_out_channels);
        assert_eq!(a.down_block_types, b.down_block_types);
        assert_eq!(a.up_block_types, b.up_block_types);
        assert_eq!(a.layers_per_block, b.layers_per_block);
        assert_eq!(a.use_linear_projection, b.use_linear_projection);
        let (a, b) = (folder.vae_config().unwrap(), file.vae_config().unwrap());
        assert_eq!(a.block_out_channels, b.block_out_channels);
        assert_eq!(a.layers_per_block, b.layers_per_block);
        assert_eq!(
            folder.scheduler_config().unwrap().prediction_type,
            file.scheduler_config().unwrap().prediction_type
        );
    }
}

#[test]
fn whole_checkpoint_loads() {
    let device = Device::flex();
    for name in [
        "sd1",
        "sd1.safetensors",
        "sd2",
        "sd2.safetensors",
        "sd1-inpaint",
    ] {
        let sd = open(name)
            .load_all(&device)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(sd.vae_config.downscale(), 8, "{name}");
    }
}

#[test]
fn taesd_decode_and_encode() {
    let device = Device::flex();
    let reference = Reference::load("taesd");
    let taesd = load_taesd(&model("taesd"), &device, FloatDType::F32).unwrap();
    assert_close(
        "TAESD decode",
        taesd.decode(reference.get("latent").tensor(&device)),
        reference.get("decoded"),
        TOLERANCE,
    );
    assert_close(
        "TAESD encode",
        taesd.encode(reference.get("image").tensor(&device)),
        reference.get("encoded"),
        TOLERANCE,
    );
}
