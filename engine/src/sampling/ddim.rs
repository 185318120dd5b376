//! DDIM with η = 0 (Song et al. 2021), as diffusers' `DDIMScheduler.step`: the next latent is the
//! clean estimate plus the predicted noise at the next level, `x' = x̂₀ + σ'·(x − x̂₀)/σ`.

use burn::tensor::Tensor;

use super::{Cancelled, Denoiser, Sigmas};

pub fn sample(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor<4>,
    sigmas: &Sigmas,
) -> Result<Tensor<4>, Cancelled> {
    for i in 0..sigmas.steps() {
        let (sigma, next) = (sigmas.sigmas[i], sigmas.sigmas[i + 1]);
        let denoised = denoiser.denoise(&x, i)?;
        let epsilon = (x - denoised.clone()).div_scalar(sigma);
        x = denoised + epsilon.mul_scalar(next);
        x = denoiser.after_step(i, x);
    }
    Ok(x)
}
