//! Group normalisation for the CPU backend in three passes over the input (mean, variance, then
//! the normalised, scaled and shifted output), with the SiLU that usually follows it and the
//! per-channel shift that often precedes it (the UNet's time embedding) folded in. Burn's group norm
//! is a chain of tensor operations, each a full pass that writes a new tensor.

use burn::nn::GroupNorm;
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

use super::cpu_conv::flex;
use super::cpu_gemm::{mul_add, vectorized};

/// Sums of up to this many f32 values are taken in f32 lanes, then added up in f64.
const BLOCK: usize = 4096;

#[inline(always)]
fn sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let mut lanes = [0f32; 8];
        let mut chunks = block.chunks_exact(8);
        for chunk in &mut chunks {
            for (lane, &x) in lanes.iter_mut().zip(chunk) {
                *lane += f(x);
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|&x| f(x)).sum();
        total += lanes.iter().map(|&l| l as f64).sum::<f64>() + tail as f64;
    }
    total
}

/// x·σ(x) with σ through e^−|x|, which cannot overflow.
#[inline(always)]
fn silu<const FMA: bool>(x: f32) -> f32 {
    let e = super::cpu_attention::exp::<FMA>(-x.abs());
    let sigmoid = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
    x * sigmoid
}

/// The shape of one group norm.
#[derive(Clone, Copy, Debug)]
pub struct Norm {
    pub batch: usize,
    pub channels: usize,
    /// Elements per channel.
    pub plane: usize,
    pub groups: usize,
    pub epsilon: f64,
    pub silu: bool,
}

/// `output = silu?(group_norm(input + shift) · gamma + beta)`.
///
/// # Shapes
/// input, output: [batch, channels, plane]; gamma, beta: [channels]; shift: [batch, channels]
pub fn normalize(
    output: &mut [f32],
    input: &[f32],
    gamma: &[f32],
    beta: &[f32],
    shift: Option<&[f32]>,
    n: &Norm,
) {
    let group_len = n.channels / n.groups * n.plane;
    assert_eq!(n.channels % n.groups, 0, "channels split into groups");
    assert_eq!(input.len(), n.batch * n.channels * n.plane, "input size");
    assert_eq!(output.len(), input.len(), "output size");
    assert_eq!(gamma.len(), n.channels, "gamma size");
    assert_eq!(beta.len(), n.channels, "beta size");
    if let Some(shift) = shift {
        assert_eq!(shift.len(), n.batch * n.channels, "shift size");
    }
    output
        .par_chunks_mut(group_len)
        .zip(input.par_chunks(group_len))
        .enumerate()
        .for_each(|(i, (out, x))| normalize_group(out, x, i, gamma, beta, shift, n));
}

vectorized! {
    /// One (batch, group) slice of [`normalize`]: `i` counts groups over the batch.
    fn normalize_group(
        out: &mut [f32],
        x: &[f32],
        i: usize,
        gamma: &[f32],
        beta: &[f32],
        shift: Option<&[f32]>,
        n: &Norm,
    ) {
        let group_len = x.len();
        let first = (i % n.groups) * (n.channels / n.groups);
        let batch = i / n.groups;
        let shift_of = |c: usize| shift.map_or(0.0, |s| s[batch * n.channels + first + c]);
        let planes = || x.chunks_exact(n.plane).enumerate();
        let total: f64 = planes()
            .map(|(c, p)| sum(p, |v| v) + shift_of(c) as f64 * n.plane as f64)
            .sum();
        let mean = total / group_len as f64;
        let squares: f64 = planes()
            .map(|(c, p)| {
                let centre = (mean - shift_of(c) as f64) as f32;
                sum(p, |v| (v - centre) * (v - centre))
            })
            .sum();
        let inv_std = 1.0 / (squares / group_len as f64 + n.epsilon).sqrt();
        for ((c, p), out) in planes().zip(out.chunks_exact_mut(n.plane)) {
            let scale = (inv_std * gamma[first + c] as f64) as f32;
            let offset = (beta[first + c] as f64 + (shift_of(c) as f64 - mean) * scale as f64) as f32;
            if n.silu {
                for (o, &v) in out.iter_mut().zip(p) {
                    *o = silu::<FMA>(mul_add::<FMA>(v, scale, offset));
                }
            } else {
                for (o, &v) in out.iter_mut().zip(p) {
                    *o = mul_add::<FMA>(v, scale, offset);
                }
            }
        }
    }
}

/// `silu?(norm(x + shift))` on the CPU backend for f32 tensors with an affine norm; `None` leaves it
/// to Burn.
///
/// # Shapes
/// x: [batch, channels, …]; shift: [batch, channels]
pub fn forward<const D: usize>(
    norm: &GroupNorm,
    x: &Tensor<D>,
    shift: Option<&Tensor<2>>,
    silu: bool,
) -> Option<Tensor<D>> {
    let (gamma, beta) = (norm.gamma.as_ref()?.val(), norm.beta.as_ref()?.val());
    let dims = x.dims();
    if x.device() != Device::flex()
        || x.dtype() != DType::F32
        || gamma.dtype() != DType::F32
        || beta.dtype() != DType::F32
        || shift.is_some_and(|s| s.dtype() != DType::F32 || s.dims() != [dims[0], dims[1]])
        || D < 3
        || dims[1] != norm.num_channels
        || !norm.num_channels.is_multiple_of(norm.num_groups)
    {
        return None;
    }
    let n = Norm {
        batch: dims[0],
        channels: dims[1],
        plane: dims[2..].iter().product(),
        groups: norm.num_groups,
        epsilon: norm.epsilon,
        silu,
    };
    let len = n.batch * n.channels * n.plane;
    let (input, start) = flex(x.clone());
    let (gamma, gamma_start) = flex(gamma);
    let (beta, beta_start) = flex(beta);
    let shift = shift.map(|s| flex(s.clone()));
    let mut output = vec![0f32; len];
    normalize(
        &mut output,
        &input.storage::<f32>()[start..][..len],
        &gamma.storage::<f32>()[gamma_start..][..n.channels],
        &beta.storage::<f32>()[beta_start..][..n.channels],
        shift
            .as_ref()
            .map(|(s, start)| &s.storage::<f32>()[*start..][..n.batch * n.channels]),
        &n,
    );
    Some(Tensor::from_data(
        TensorData::new(output, dims),
        &x.device(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu as burn_silu;

    #[test]
    fn matches_burns_group_norm_and_silu() {
        let device = Device::flex();
        for (batch, channels, h, w, groups, silu, shifted) in [
            (2, 8, 5, 7, 4, true, false),
            (1, 6, 3, 3, 3, false, false),
            (2, 32, 64, 65, 8, true, true),
        ] {
            let mut norm = crate::models::layers::group_norm(groups, channels, 1e-5, &device);
            let n = Distribution::Normal(0.5, 2.0);
            norm.gamma = Some(Param::from_tensor(Tensor::random([channels], n, &device)));
            norm.beta = Some(Param::from_tensor(Tensor::random([channels], n, &device)));
            let x = Tensor::<4>::random([batch, channels, h, w], n, &device).add_scalar(3.0);
            let shift = shifted.then(|| Tensor::<2>::random([batch, channels], n, &device));

            let shifted_x = match &shift {
                Some(s) => x.clone() + s.clone().unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3),
                None => x.clone(),
            };
            let mut expected = norm.forward(shifted_x);
            if silu {
                expected = burn_silu(expected);
            }
            let actual = forward(&norm, &x, shift.as_ref(), silu).expect("CPU path taken");
            let error: f32 = (actual - expected).abs().max().into_scalar();
            assert!(
                error < 2e-5,
                "max error {error} for {batch}×{channels}×{h}×{w}"
            );
        }
    }

    #[test]
    fn silu_is_accurate_and_finite_everywhere() {
        for silu in [silu::<false>, silu::<true>] {
            for i in -20_000..20_000 {
                let x = i as f32 * 0.01;
                let want = x as f64 / (1.0 + (-x as f64).exp());
                let got = silu(x) as f64;
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "silu({x}) = {got}, not {want}"
                );
            }
            assert_eq!(silu(1e30), 1e30);
            assert!(silu(-1e30).abs() < 1e-6);
        }
    }
}
