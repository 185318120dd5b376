//! The GEGLU of the UNet's feed-forward layers, `hidden · gelu(gate)` with the exact (erf) GELU, in
//! one pass for the CPU backend. Burn computes it as a chunk, a GELU that calls the scalar `erff`
//! for every element, and a product, three passes that write new tensors.

use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu_attention::exp;
use super::cpu_conv::flex;
use super::cpu_gemm::{mul_add, vectorized};

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
    /// `out = hidden · gelu(gate)` for one row, whose first half is `hidden` and second `gate`.
    fn geglu_row(out: &mut [f32], row: &[f32]) {
        let (hidden, gate) = row.split_at(out.len());
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * gelu::<FMA>(g);
        }
    }
}

/// `hidden · gelu(gate)` where `[hidden, gate]` are the two halves of `x`'s last dimension, on the
/// CPU backend for f32; `None` leaves it to Burn.
///
/// # Shapes
/// x: [batch, tokens, 2·inner] → [batch, tokens, inner]
pub fn geglu(x: &Tensor<3>) -> Option<Tensor<3>> {
    let [batch, tokens, width] = x.dims();
    if x.device() != Device::flex() || x.dtype() != DType::F32 || !width.is_multiple_of(2) {
        return None;
    }
    let inner = width / 2;
    let (input, start) = flex(x.clone());
    let input = &input.storage::<f32>()[start..][..batch * tokens * width];
    let mut output = vec![0f32; batch * tokens * inner];
    output
        .par_chunks_mut(inner)
        .zip(input.par_chunks_exact(width))
        .for_each(|(out, row)| geglu_row(out, row));
    Some(Tensor::from_data(
        TensorData::new(output, [batch, tokens, inner]),
        &x.device(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation::gelu as burn_gelu;

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

    #[test]
    fn matches_burns_chunk_gelu_and_product() {
        let device = Device::flex();
        let x = Tensor::<3>::random([2, 37, 2 * 44], Distribution::Normal(0.0, 3.0), &device);
        let [hidden, gate]: [Tensor<3>; 2] = x.clone().chunk(2, 2).try_into().unwrap();
        let expected = hidden * burn_gelu(gate);
        let actual = geglu(&x).expect("CPU path taken");
        let error: f32 = (actual - expected).abs().max().into_scalar();
        assert!(error < 1e-5, "max error {error}");
    }
}
