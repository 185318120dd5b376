//! Euler ancestral: an Euler step down to σ_down, then fresh noise up to σ_next, as diffusers'
//! `EulerAncestralDiscreteScheduler.step` (k-diffusion `sample_euler_ancestral` with η = 1).

use burn::tensor::Tensor;

use super::{Cancelled, Denoiser, Sigmas, noise_like};
use crate::noise::TorchRng;

pub fn sample(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor<4>,
    sigmas: &Sigmas,
    rng: &mut TorchRng,
) -> Result<Tensor<4>, Cancelled> {
    for i in 0..sigmas.steps() {
        let (from, to) = (sigmas.sigmas[i], sigmas.sigmas[i + 1]);
        let denoised = denoiser.denoise(&x, i)?;
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = (x.clone() - denoised).div_scalar(from);
        x = x + derivative.mul_scalar(sigma_down - from);
        // diffusers draws the noise on every step, the last included.
        let noise = noise_like(&x, rng);
        x = x + noise.mul_scalar(sigma_up);
        x = denoiser.after_step(i, x);
    }
    Ok(x)
}
