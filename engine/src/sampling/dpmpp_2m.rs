//! DPM-Solver++(2M) (Lu et al. 2022), as diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, midpoint form: first order on the first step and
//! on the step down to σ = 0, second order (using the previous x̂₀) in between.

use burn::tensor::Tensor;

use super::{Cancelled, Denoiser, Sigmas};

pub fn sample(
    denoiser: &mut dyn Denoiser,
    mut x: Tensor<4>,
    sigmas: &Sigmas,
) -> Result<Tensor<4>, Cancelled> {
    let lambda = |sigma: f32| -f64::from(sigma).ln();
    let mut previous: Option<Tensor<4>> = None;
    for i in 0..sigmas.steps() {
        let (sigma, next) = (sigmas.sigmas[i], sigmas.sigmas[i + 1]);
        let denoised = denoiser.denoise(&x, i)?;
        if next == 0.0 {
            x = denoised.clone();
        } else {
            let h = lambda(next) - lambda(sigma);
            let estimate = match &previous {
                Some(older) => {
                    let r = (lambda(sigma) - lambda(sigmas.sigmas[i - 1])) / h;
                    let d1 = (denoised.clone() - older.clone()).div_scalar(r as f32);
                    denoised.clone() + d1.mul_scalar(0.5)
                }
                None => denoised.clone(),
            };
            let decay = (-h).exp_m1() as f32;
            x = x.mul_scalar(next / sigma) - estimate.mul_scalar(decay);
        }
        previous = Some(denoised);
        x = denoiser.after_step(i, x);
    }
    Ok(x)
}
