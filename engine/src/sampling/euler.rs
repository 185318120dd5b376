//! Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn), as
//! diffusers' `EulerDiscreteScheduler.step`.

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
        let derivative = (x.clone() - denoised).div_scalar(sigma);
        x = x + derivative.mul_scalar(next - sigma);
        x = denoiser.after_step(i, x);
    }
    Ok(x)
}
