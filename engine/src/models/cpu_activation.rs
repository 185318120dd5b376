//! The feed-forward layers of the UNet's transformer blocks and of the CLIP text encoder for the
//! CPU backend: the UNet's GEGLU, `out(hidden · gelu(gate))` with the exact (erf) GELU, and CLIP's
//! MLP, `fc2(act(fc1(x)))` with QuickGELU (`x · σ(1.702 x)`) or GELU. The activation runs in place on
//! the first layer's rows, adding its bias as it reads, and the second layer reads the result where
//! it lies. Burn computes the GEGLU as a chunk, a GELU that calls the scalar `erff` for every
//! element, and a product, and QuickGELU as a scaling, a sigmoid that calls the scalar `expf` and a
//! product: passes that each write a new tensor.

use burn::nn::Linear;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::clip::ClipActivation;
use super::cpu_attention::exp;
use super::cpu_conv::flex;
use super::cpu_gemm::{Dst, Matrix, matmul, mul_add, vectorized};
use super::cpu_linear;
use super::cpu_pool;

/// erf(x) by Abramowitz & Stegun 7.1.26 (absolute error 1.5e-7, below 6e-7 in f32 arithmetic), in
/// plain arithmetic the compiler vectorises.
#[inline(always)]
fn erf<const FMA: bool>(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / mul_add::<FMA>(0.327_591_1, a, 1.0);
    let mut poly = 1.061_405_4;
    for c in [-1.453_152, 1.421_413_7, -0.284_496_74, 0.254_829_6] {
        poly = mul_add::<FMA>(poly, t, c);
    }
    mul_add::<FMA>(-poly * t, exp::<FMA>(-a * a), 1.0).copysign(x)
}

/// x · Φ(x), PyTorch's default GELU.
#[inline(always)]
fn gelu<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// σ(z) = 1 / (1 + e⁻ᶻ), from e^(−|z|) so that the exponential never overflows.
#[inline(always)]
fn sigmoid<const FMA: bool>(z: f32) -> f32 {
    let e = exp::<FMA>(-z.abs());
    let r = 1.0 / (1.0 + e);
    if z >= 0.0 { r } else { e * r }
}

vectorized! {
    /// One row of a CLIP MLP's first layer before its bias: `row ← act(row + bias)`, in place,
    /// with QuickGELU (`quick`) or the exact GELU.
    fn activate_row(row: &mut [f32], bias: &[f32], quick: bool) {
        if quick {
            for (x, &b) in row.iter_mut().zip(bias) {
                let y = *x + b;
                *x = y * sigmoid::<FMA>(1.702 * y);
            }
        } else {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x = gelu::<FMA>(*x + b);
            }
        }
    }
}

vectorized! {
    /// One row of a GEGLU projection whose first half is `hidden` and second `gate`, before their
    /// biases: `hidden ← (hidden + b_hidden) · gelu(gate + b_gate)`, in place.
    fn geglu_row(row: &mut [f32], bias: &[f32]) {
        let (hidden, gate) = row.split_at_mut(row.len() / 2);
        let (bias_hidden, bias_gate) = bias.split_at(bias.len() / 2);
        for (((h, &g), &bh), &bg) in hidden.iter_mut().zip(&*gate).zip(bias_hidden).zip(bias_gate) {
            *h = (*h + bh) * gelu::<FMA>(g + bg);
        }
    }
}

/// Whether [`feed_forward`] can compute a GEGLU feed-forward on `x`: f32 on the CPU backend, and
/// a projection with a bias to twice the output layer's input width.
pub fn feed_forward_applies(proj: &Linear, out: &Linear, x: &Tensor<3>) -> bool {
    let ([_, width], [inner, _]) = (proj.weight.dims(), out.weight.dims());
    cpu_linear::applies(proj, x) && proj.bias.is_some() && width == 2 * inner
}

/// `residual + out(hidden · gelu(gate))` with `[hidden, gate] = proj(x)` halved along the last
/// dimension and the exact (erf) GELU, for an `x` that [`feed_forward_applies`] to. The
/// projection is written once and the GEGLU overwrites its hidden half in place, adding the
/// projection's bias as it reads; `out` reads that half where it lies, so the activations between
/// the two layers are neither split, nor copied, nor given a buffer of their own.
///
/// # Shapes
/// x: [batch, tokens, d_input], residual: [batch, tokens, d_output] → [batch, tokens, d_output]
pub fn feed_forward(proj: &Linear, out: &Linear, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
    two_layers(proj, out, x, residual, geglu_row, true)
}

/// Whether [`mlp`] can compute `fc2(act(fc1(x)))`: `x` and both layers f32 on the CPU backend.
pub fn mlp_applies(fc1: &Linear, fc2: &Linear, x: &Tensor<3>) -> bool {
    let ([_, inner], [inputs, _]) = (fc1.weight.dims(), fc2.weight.dims());
    cpu_linear::applies(fc1, x) && cpu_linear::applies(fc2, x) && inner == inputs
}

/// `residual + fc2(act(fc1(x)))`, a CLIP encoder layer's MLP, for an `x` that [`mlp_applies`] to:
/// the first layer's product is written once, activated in place with its bias, and read by the
/// second layer where it lies.
///
/// # Shapes
/// x: [batch, tokens, d_input], residual: [batch, tokens, d_output] → [batch, tokens, d_output]
pub fn mlp(
    fc1: &Linear,
    fc2: &Linear,
    activation: ClipActivation,
    x: Tensor<3>,
    residual: Tensor<3>,
) -> Tensor<3> {
    let quick = activation == ClipActivation::QuickGelu;
    let activate = |row: &mut [f32], bias: &[f32]| activate_row(row, bias, quick);
    two_layers(fc1, fc2, x, residual, activate, false)
}

/// `residual + second(h)` with `h` the first layer's product, one row per token, which
/// `activate(row, bias)` turns in place into the second layer's input (the bias is zeros for a
/// first layer without one). With `gated`, the second layer reads the first half of each row,
/// the activation having used the second half as its gate.
fn two_layers(
    first: &Linear,
    second: &Linear,
    x: Tensor<3>,
    residual: Tensor<3>,
    activate: impl Fn(&mut [f32], &[f32]) + Sync,
    gated: bool,
) -> Tensor<3> {
    let [batch, tokens, d_input] = x.dims();
    let rows = batch * tokens;
    let parameters = cpu_linear::Parameters::of(first);
    let width = parameters.weight().cols;
    let (x, start) = flex(x);
    let x = &x.storage::<f32>()[start..][..rows * d_input];
    // Up to 84 MB at 64² latents, kept between layers rather than faulted in again for each.
    let mut hidden = cpu_pool::floats(rows * width);
    matmul(
        &mut hidden,
        width,
        Dst::Overwrite,
        Matrix::new(x, rows, d_input, d_input),
        parameters.weight(),
        1.0,
        true,
    );
    let zeros;
    let bias = match parameters.bias() {
        Some(bias) => bias,
        None => {
            zeros = vec![0.0; width];
            &zeros
        }
    };
    hidden
        .par_chunks_exact_mut(width)
        .for_each(|row| activate(row, bias));
    let columns = if gated { width / 2 } else { width };
    let hidden = Matrix::new(&hidden, rows, columns, width);
    cpu_linear::apply(second, hidden, residual.dims(), Some(residual))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::{gelu as burn_gelu, sigmoid as burn_sigmoid};
    use burn::tensor::{Device, Distribution};

    use crate::models::layers::linear;

    #[test]
    fn erf_is_accurate_everywhere() {
        // Both builds: separate products and sums, and fused multiply-adds.
        for (erf, gelu) in [
            (
                erf::<false> as fn(f32) -> f32,
                gelu::<false> as fn(f32) -> f32,
            ),
            (erf::<true>, gelu::<true>),
        ] {
            let mut worst = 0f64;
            for i in -60_000..60_000 {
                let x = i as f64 * 1e-4;
                // erf by its Maclaurin series below 3, beyond by erfc's asymptotic series.
                let want = if x.abs() < 3.0 {
                    let (mut term, mut total, mut n) = (x, x, 0.0);
                    while term.abs() > 1e-17 {
                        n += 1.0;
                        term *= -x * x / n;
                        total += term / (2.0 * n + 1.0);
                    }
                    total * 2.0 / std::f64::consts::PI.sqrt()
                } else {
                    let a2 = x * x;
                    let series = 1.0 - 1.0 / (2.0 * a2) + 3.0 / (4.0 * a2 * a2)
                        - 15.0 / (8.0 * a2 * a2 * a2);
                    let erfc = (-a2).exp() / (x.abs() * std::f64::consts::PI.sqrt()) * series;
                    x.signum() * (1.0 - erfc)
                };
                let got = erf(x as f32) as f64;
                worst = worst.max((got - want).abs());
            }
            assert!(worst < 6e-7, "max error {worst}");
            assert_eq!(erf(f32::INFINITY), 1.0);
            assert_eq!(erf(f32::NEG_INFINITY), -1.0);
            assert_eq!(gelu(-1e4), 0.0);
        }
    }

    /// Against Burn's linear layers, chunk, GELU and product, on uneven widths.
    #[test]
    fn matches_burns_feed_forward() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<3>::random([2, 37, 24], normal, &device);
        let residual = Tensor::<3>::random([2, 37, 24], normal, &device);
        let (proj, out) = (
            linear(24, 2 * 44, true, &device),
            linear(44, 24, true, &device),
        );
        assert!(feed_forward_applies(&proj, &out, &x));
        let [hidden, gate]: [Tensor<3>; 2] =
            proj.forward(x.clone()).chunk(2, 2).try_into().unwrap();
        let expected = out.forward(hidden * burn_gelu(gate)) + residual.clone();
        let actual = feed_forward(&proj, &out, x, residual);
        let error: f32 = (actual - expected).abs().max().into_scalar();
        assert!(error < 1e-5, "max error {error}");
    }

    /// Against Burn's linear layers and activations, with and without a first-layer bias, on
    /// uneven widths and inputs large enough to reach both tails of the sigmoid.
    #[test]
    fn matches_burns_clip_mlp() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 4.0);
        for (activation, bias) in [
            (ClipActivation::QuickGelu, true),
            (ClipActivation::QuickGelu, false),
            (ClipActivation::Gelu, true),
        ] {
            let x = Tensor::<3>::random([2, 13, 24], normal, &device);
            let residual = Tensor::<3>::random([2, 13, 24], normal, &device);
            let (fc1, fc2) = (linear(24, 44, bias, &device), linear(44, 24, true, &device));
            assert!(mlp_applies(&fc1, &fc2, &x));
            let h = fc1.forward(x.clone());
            let h = match activation {
                ClipActivation::QuickGelu => h.clone() * burn_sigmoid(h.mul_scalar(1.702)),
                ClipActivation::Gelu => burn_gelu(h),
            };
            let expected = fc2.forward(h) + residual.clone();
            let actual = mlp(&fc1, &fc2, activation, x, residual);
            let error: f32 = (actual - expected.clone()).abs().max().into_scalar();
            let scale: f32 = expected.abs().max().into_scalar();
            assert!(
                error < 2e-6 * scale,
                "{activation:?}, bias {bias}: max error {error} of {scale}"
            );
        }
    }

    #[test]
    fn sigmoid_is_accurate_in_both_tails() {
        for sigmoid in [sigmoid::<false>, sigmoid::<true>] {
            // Down to e⁻⁸⁰; below e⁻⁸⁷, the exponential's floor, σ stays below 2e-38.
            for i in -16_000..16_000 {
                let z = i as f32 * 5e-3;
                let want = 1.0 / (1.0 + (-(z as f64)).exp());
                let got = sigmoid(z) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want,
                    "σ({z}) = {got}, not {want}"
                );
            }
            assert_eq!(sigmoid(f32::INFINITY), 1.0);
            assert!(sigmoid(-200.0) < 2e-38);
        }
    }
}
