//! Noise schedules and samplers. Samplers are pure functions of `(denoiser, x, sigmas, rng)` in
//! k-diffusion's σ parametrisation (Karras et al. 2022): `x` is the noisy latent at level σ and the
//! denoiser returns its estimate of the clean latent x̂₀. Each file follows the diffusers scheduler of
//! the same name step for step; the ones that work on `x_t = x / √(σ² + 1)` (DDIM, DPM-Solver, LCM)
//! compute the same numbers in these terms.

pub mod ddim;
pub mod dpmpp_2m;
pub mod euler;
pub mod euler_ancestral;
pub mod lcm;
pub mod schedule;

use burn::tensor::Tensor;

use crate::noise::TorchRng;
use crate::request::Sampler;
pub use schedule::{SchedulerConfig, Sigmas};

/// Sampling stopped because the job was cancelled before the model ran again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled {
    /// The step that did not run.
    pub at_step: usize,
}

/// The model as a sampler sees it.
pub trait Denoiser {
    /// x̂₀ for the latents `x` at step `step` of the schedule, or `Cancelled`.
    fn denoise(&mut self, x: &Tensor<4>, step: usize) -> Result<Tensor<4>, Cancelled>;

    /// Called with the latents after step `step`; returns the latents to continue from (inpainting
    /// with an ordinary model puts the known region back here).
    fn after_step(&mut self, _step: usize, x: Tensor<4>) -> Tensor<4> {
        x
    }
}

/// Runs `sampler` from `x` through `sigmas`.
pub fn sample(
    sampler: Sampler,
    denoiser: &mut dyn Denoiser,
    x: Tensor<4>,
    sigmas: &Sigmas,
    rng: &mut TorchRng,
) -> Result<Tensor<4>, Cancelled> {
    match sampler {
        Sampler::Euler => euler::sample(denoiser, x, sigmas),
        Sampler::EulerA => euler_ancestral::sample(denoiser, x, sigmas, rng),
        Sampler::Ddim => ddim::sample(denoiser, x, sigmas),
        Sampler::DpmPp2m => dpmpp_2m::sample(denoiser, x, sigmas),
        Sampler::Lcm => lcm::sample(denoiser, x, sigmas, rng),
    }
}

/// Unit Gaussian noise shaped like `like`, drawn from `rng` as torch's `randn_tensor` would.
pub fn noise_like(like: &Tensor<4>, rng: &mut TorchRng) -> Tensor<4> {
    let shape = like.dims();
    Tensor::<1>::from_floats(rng.randn(shape.iter().product()).as_slice(), &like.device())
        .reshape(shape)
}
