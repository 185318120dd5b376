//! burn-wgpu computes what the CPU backend computes, on one resnet block and one transformer block
//! (tiny shapes: on machines without a GPU wgpu runs on software Vulkan, which compiles every new
//! kernel shape slowly). Needs a Vulkan driver: `scripts/install-deps.sh` installs Mesa's.

use studio_engine::Tensor;
use studio_engine::device::{Backend, select};
use studio_engine::models::unet::attention::TransformerConfig;
use studio_engine::models::unet::resnet::ResnetConfig;
use studio_engine::{Device, Module};
use studio_tests::max_error;

fn wgpu() -> Device {
    select(Backend::Wgpu)
        .unwrap_or_else(|e| panic!("{e}; install a Vulkan driver (scripts/install-deps.sh)"))
        .device
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

fn assert_same(what: &str, gpu: Vec<f32>, cpu: Vec<f32>) {
    let (error, scale) = max_error(&gpu, &cpu);
    assert!(
        error <= 1e-4 * scale,
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

fn burn_distribution() -> studio_engine::Distribution {
    studio_engine::Distribution::Normal(0.0, 1.0)
}
