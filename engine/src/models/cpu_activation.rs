//! The GEGLU feed-forward of the UNet's transformer blocks, `out(hidden · gelu(gate))` with the
//! exact (erf) GELU, for the CPU backend: the GELU runs in place on the projection's rows and the
//! output layer reads the result where it lies. Burn computes it as a chunk, a GELU that calls the
//! scalar `erff` for every element, and a product, three passes that write new tensors.

use burn::nn::Linear;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::cpu_attention::exp;
use super::cpu_conv::flex;
use super::cpu_gemm::{Matrix, mul_add, product, vectorized};
use super::cpu_linear;

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
    let [batch, tokens, d_input] = x.dims();
    let rows = batch * tokens;
    let parameters = cpu_linear::Parameters::of(proj);
    let width = parameters.weight().cols;
    let (x, start) = flex(x);
    let x = &x.storage::<f32>()[start..][..rows * d_input];
    let mut projected = product(
        Matrix::new(x, rows, d_input, d_input),
        parameters.weight(),
        1.0,
        true,
    );
    let bias = parameters.bias().expect("a GEGLU projection with a bias");
    projected
        .par_chunks_exact_mut(width)
        .for_each(|row| geglu_row(row, bias));
    let hidden = Matrix::new(&projected, rows, width / 2, width);
    cpu_linear::apply(out, hidden, residual.dims(), Some(residual))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::gelu as burn_gelu;
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
}
