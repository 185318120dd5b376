//! Latent consistency sampling (Luo et al. 2023), as diffusers' `LCMScheduler.step`: each step takes
//! the consistency function's output (x̂₀ blended with the input by the boundary-condition scalings)
//! and re-noises it to the next level with fresh noise; the last step returns it as is.

use burn::tensor::Tensor;

use super::{Cancelled, Denoiser, Sigmas, noise_like};
use crate::noise::TorchRng;

const SIGMA_DATA: f32 = 0.5;
const TIMESTEP_SCALING: f32 = 10.0;

pub fn sample(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor<4>,
    sigmas: &Sigmas,
    rng: &mut TorchRng,
) -> Result<Tensor<4>, Cancelled> {
    let last = sigmas.steps() - 1;
    for i in 0..=last {
        let sigma = sigmas.sigmas[i];
        let denoised = denoiser.denoise(&x, i)?;
        let t = sigmas.timesteps[i] * TIMESTEP_SCALING;
        let c_skip = SIGMA_DATA * SIGMA_DATA / (t * t + SIGMA_DATA * SIGMA_DATA);
        let c_out = t / (t * t + SIGMA_DATA * SIGMA_DATA).sqrt();
        let x_t = x.div_scalar((sigma * sigma + 1.0).sqrt());
        let consistent = denoised.mul_scalar(c_out) + x_t.mul_scalar(c_skip);
        x = if i < last {
            let noise = noise_like(&consistent, rng);
            consistent + noise.mul_scalar(sigmas.sigmas[i + 1])
        } else {
            consistent
        };
        x = denoiser.after_step(i, x);
    }
    Ok(x)
}
