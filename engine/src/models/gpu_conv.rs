//! Convolutions and group norms shaped for a GPU's matrix-product and reduction kernels.
//!
//! On wgpu, Burn runs a dense k×k convolution as a direct convolution (without its `autotune`
//! feature it always picks that kernel, and its faster implicit-GEMM ones need cooperative-matrix
//! instructions, which WGSL lacks): on an H100 that reached about 1 TFLOP/s and took 86% of a UNet
//! step, while the same GPU's matrix product runs at 14 TFLOP/s. So a convolution here is an
//! im2col product: the input's k² shifted windows written out as one matrix (in bands of output rows, so a 512² VAE layer never builds a matrix of gigabytes) and
//! multiplied by the weights. A GroupNorm reduces over each group's millions of values in one
//! pass with one workgroup per group, 32 workgroups for a whole GPU; here each image row is
//! summed first, so the long reduction becomes many short ones.

use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::ops::PadMode;
use burn::tensor::{DType, Device, Tensor};

/// How [`convolve`] lays out its products.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// The most values one band's im2col matrix holds.
    pub band_values: usize,
    /// Products with fewer output columns than this split their sums...
    pub split_below: usize,
    /// ...into up to 16 parts of at least this many terms.
    pub min_part: usize,
}

/// The plan for a GPU: bands of at most 256 MB in f32; a product narrower than 1024 columns (the
/// convolutions at 4² to 16² latents) splits a sum of 11 520 terms into 16 parts of 720, so the
/// GPU has 16 times the threads to run it on.
pub const GPU: Plan = Plan {
    band_values: 64 << 20,
    split_below: 1024,
    min_part: 512,
};

/// True where these forms replace Burn's own kernels: every device but the CPU backend, whose
/// convolutions and norms have their own kernels (`cpu_conv`, `cpu_norm`).
pub fn applies<const D: usize>(x: &Tensor<D>) -> bool {
    x.device() != Device::flex()
}

/// `conv(x)` as im2col matrix products, for a convolution with stride 1, no dilation, no groups
/// and the same padding on every side; `None` for any other (Burn's own kernel runs it).
/// The products take half-precision input as it is: Burn's matrix products sum in f32.
pub fn convolve(conv: &Conv2d, x: Tensor<4>, plan: &Plan) -> Option<Tensor<4>> {
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    if conv.stride != [1, 1] || conv.dilation != [1, 1] || conv.groups != 1 {
        return None;
    }
    let weight = conv.weight.val();
    let [channels_out, channels_in, kh, kw] = weight.dims();
    let [batch, channels, height, width] = x.dims();
    let (padded_h, padded_w) = (height + 2 * padding, width + 2 * padding);
    if channels != channels_in || padded_h < kh || padded_w < kw {
        return None;
    }
    let (out_h, out_w) = (padded_h + 1 - kh, padded_w + 1 - kw);
    let taps = kh * kw;
    let weight = weight.reshape([channels_out, channels_in * taps]);
    let bias = conv
        .bias
        .as_ref()
        .map(|b| b.val().reshape([channels_out, 1]));
    // [channels, batch, h, w]: each band's matrix comes out as [channels·taps, batch·rows·w],
    // one product for the whole batch.
    let x = x.swap_dims(0, 1);
    let x = if padding > 0 {
        x.pad(
            [(padding, padding), (padding, padding)],
            PadMode::Constant(0.0),
        )
    } else {
        x
    };
    let rows_per_band = (plan.band_values / (channels_in * taps * batch * out_w)).clamp(1, out_h);
    let mut bands = Vec::with_capacity(out_h.div_ceil(rows_per_band));
    for top in (0..out_h).step_by(rows_per_band) {
        let rows = rows_per_band.min(out_h - top);
        let columns = if taps == 1 {
            x.clone()
                .slice([0..channels, 0..batch, top..top + rows, 0..out_w])
                .reshape([channels_in, batch * rows * out_w])
        } else {
            // The band's input rows, and their k² windows as a view (`unfold` copies nothing
            // off the CPU backend): the reshape writes the whole im2col matrix in one pass.
            let band = if rows == out_h {
                x.clone()
            } else {
                x.clone()
                    .slice([0..channels, 0..batch, top..top + rows + kh - 1, 0..padded_w])
            };
            band.unfold::<5, _>(2, kh, 1) // [channels, batch, rows, padded_w, kh]
                .unfold::<6, _>(3, kw, 1) // [channels, batch, rows, out_w, kh, kw]
                .permute([0, 4, 5, 1, 2, 3])
                .reshape([channels_in * taps, batch * rows * out_w])
        };
        let y = product(weight.clone(), columns, plan);
        let y = match &bias {
            Some(bias) => y + bias.clone(),
            None => y,
        };
        bands.push(y.reshape([channels_out, batch, rows, out_w]));
    }
    let y = if bands.len() == 1 {
        bands.pop().expect("one band")
    } else {
        Tensor::cat(bands, 2)
    };
    Some(y.swap_dims(0, 1))
}

/// `weight · columns`, its sum split into parts multiplied side by side and added in f32 where the
/// product is narrow and its sum long (see [`Plan`]).
fn product(weight: Tensor<2>, columns: Tensor<2>, plan: &Plan) -> Tensor<2> {
    let [rows, terms] = weight.dims();
    let [_, width] = columns.dims();
    let mut parts = 1;
    while width < plan.split_below
        && parts < 16
        && terms.is_multiple_of(parts * 2)
        && terms / (parts * 2) >= plan.min_part
    {
        parts *= 2;
    }
    if parts == 1 {
        return weight.matmul(columns);
    }
    let dtype = columns.dtype();
    let weight = weight.reshape([rows, parts, terms / parts]).swap_dims(0, 1);
    let columns = columns.reshape([parts, terms / parts, width]);
    let partial = weight.matmul(columns);
    let sum = partial.cast(DType::F32).sum_dim(0).reshape([rows, width]);
    sum.cast(dtype)
}

/// `norm(x)` for x of shape [batch, channels, height, width], the sums taken row by row first.
pub fn group_norm(norm: &GroupNorm, x: Tensor<4>) -> Tensor<4> {
    let [batch, channels, height, width] = x.dims();
    let groups = norm.num_groups;
    let per_group = (channels / groups * height * width) as f64;
    let group_sum = |t: Tensor<4>| {
        t.sum_dim(3)
            .reshape([batch, groups, channels / groups * height])
            .sum_dim(2)
            .reshape([batch, groups, 1, 1])
    };
    let grouped = |t: Tensor<4>| t.reshape([batch, groups, channels / groups, height * width]);
    let mean = group_sum(x.clone()).div_scalar(per_group);
    let centered = grouped(x) - mean;
    let centered = centered.reshape([batch, channels, height, width]);
    let variance = group_sum(centered.clone().square()).div_scalar(per_group);
    let scale = variance.add_scalar(norm.epsilon).sqrt().recip();
    let y = (grouped(centered) * scale).reshape([batch, channels, height, width]);
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => {
            y * gamma.val().reshape([1, channels, 1, 1]) + beta.val().reshape([1, channels, 1, 1])
        }
        _ => y,
    }
}

/// True where [`group_norm`] takes `norm` on `x`: off the CPU backend, on a [batch, channels,
/// height, width] map with the norm's channels (anything else is left to Burn, whose error names it).
pub fn group_norm_applies<const D: usize>(norm: &GroupNorm, x: &Tensor<D>) -> bool {
    applies(x) && D == 4 && x.dims()[1] == norm.num_channels
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::layers;
    use burn::tensor::Distribution;

    fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
    }

    fn max_difference(a: Tensor<4>, b: Tensor<4>) -> (f32, f32) {
        let scale = b.clone().abs().max().into_scalar();
        ((a - b).abs().max().into_scalar(), scale)
    }

    #[test]
    fn im2col_products_match_burns_convolution() {
        let device = Device::flex();
        for (channels, kernel, padding, bias) in [
            (6, 3, 1, true),
            (6, 1, 0, true),
            (8, 3, 0, false),
            (6, 5, 2, true),
        ] {
            let conv = layers::conv2d([channels, 5], kernel, 1, padding, bias, &device);
            let x = random([2, channels, 9, 7], &device);
            let expected = conv.forward(x.clone());
            // One band, and bands of one or two rows with a short last band; sums whole, and
            // split in 2 to 8 parts (72 terms: 8 parts of 9).
            for band_values in [GPU.band_values, channels * kernel * kernel * 2 * 7, 1] {
                for split_below in [0, usize::MAX] {
                    let plan = Plan {
                        band_values,
                        split_below,
                        min_part: 1,
                    };
                    let y = convolve(&conv, x.clone(), &plan).expect("applies");
                    assert_eq!(y.dims(), expected.dims());
                    let (error, scale) = max_difference(y, expected.clone());
                    assert!(
                        error <= 1e-5 * scale,
                        "{channels}ch k{kernel} p{padding} {plan:?}: off by {error} (scale {scale})"
                    );
                }
            }
        }
    }

    #[test]
    fn strided_and_grouped_convolutions_are_left_to_burn() {
        let device = Device::flex();
        let x = random([1, 4, 8, 8], &device);
        let strided = layers::conv2d([4, 4], 3, 2, 1, true, &device);
        assert!(convolve(&strided, x.clone(), &GPU).is_none());
        let mut grouped = layers::conv2d([4, 4], 3, 1, 1, true, &device);
        grouped.groups = 2;
        assert!(convolve(&grouped, x, &GPU).is_none());
    }

    #[test]
    fn row_first_group_norm_matches_burns() {
        let device = Device::flex();
        let mut norm = layers::group_norm(4, 8, 1e-6, &device);
        norm.gamma = norm
            .gamma
            .map(|g| g.map(|_| Tensor::random([8], Distribution::Normal(1.0, 0.5), &device)));
        norm.beta = norm
            .beta
            .map(|b| b.map(|_| Tensor::random([8], Distribution::Normal(0.0, 0.5), &device)));
        // An offset mean, where a one-pass E[x²] - E[x]² would lose digits.
        let x = random([2, 8, 6, 5], &device).add_scalar(30.0);
        let (error, scale) = max_difference(group_norm(&norm, x.clone()), norm.forward(x));
        assert!(error <= 1e-4 * scale, "off by {error} (scale {scale})");
    }
}
