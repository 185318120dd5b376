//! Convolutions for the CPU backend, the bulk of the UNet's and the decoders' work.
//!
//! The output is computed a band of rows at a time: the band's im2col matrix is built straight from
//! the NCHW input (row copies, no layout change of the whole tensor), and one matrix product writes
//! the band into its place in every output channel, so there is no scatter pass. The product adds
//! onto the bias, and optionally onto a residual (the ResNet shortcut), which is then updated in
//! place. A nearest 2× upsampling in front of the convolution is folded into the im2col step, so
//! the upsampled map, the largest tensor of a VAE decode, never exists. Burn's CPU convolution
//! converts the whole input to NHWC, builds im2col tiles of 512 pixels and scatters each tile's
//! result; on Stable Diffusion's shapes this runs at a fraction of the machine's matmul rate. The
//! UNet's three strided (downsampling) convolutions, too, took 0.65× the time here as in Burn's
//! (AVX2 Zen 3, two cores, batch 2, best of 5 in two runs each: 70–76 ms against 109–114 ms).

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

use super::cpu_gemm::{Dst, Matrix, matmul, product};
use super::cpu_pool;
use super::cpu_winograd::{self, Tile, Width};

/// Floats in one band's im2col matrix (4 MiB): large enough for full-rate products, small enough to
/// stay in the last-level cache between being written and being read by the product (64-channel
/// convolutions at 512² run at half the rate with 16 MiB bands), and out of the way of a 512²
/// decode's memory peak.
const BAND_FLOATS: usize = 1 << 20;

/// The shape of one convolution: the input's size (before any upsampling) and the kernel's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    pub batch: usize,
    pub channels_in: usize,
    pub height: usize,
    pub width: usize,
    pub channels_out: usize,
    pub kernel: usize,
    pub padding: usize,
    /// The step between the input positions of neighbouring outputs: 1, or 2 in the UNet's and
    /// the encoder's downsampling convolutions.
    pub stride: usize,
    /// Nearest-neighbour 2× upsampling of the input before the convolution (stride 1 only).
    pub upsample: bool,
}

impl Geometry {
    pub(crate) fn scale(&self) -> usize {
        if self.upsample { 2 } else { 1 }
    }

    /// Height and width of the output.
    pub fn output_size(&self) -> [usize; 2] {
        let s = self.scale();
        let stride = self.stride.max(1);
        [self.height, self.width]
            .map(|d| (d * s + 2 * self.padding + stride - self.kernel) / stride)
    }

    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.padding == 0 && self.stride == 1 && !self.upsample
    }

    fn valid(&self) -> bool {
        let s = self.scale();
        self.kernel >= 1
            && self.stride >= 1
            && (self.stride == 1 || !self.upsample)
            && self.height * s + 2 * self.padding >= self.kernel
            && self.width * s + 2 * self.padding >= self.kernel
            && self.batch * self.channels_in * self.channels_out * self.height * self.width > 0
    }
}

/// What a convolution reads.
///
/// # Shapes
/// input: [batch, channels_in, height, width]; weight: [channels_out, channels_in, kernel, kernel];
/// bias: [channels_out]
#[derive(Clone, Copy, Debug)]
pub struct Operands<'a> {
    pub input: &'a [f32],
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
}

/// How a convolution stores its result: written over the output, or added onto what it holds (a
/// residual of its shape), then, with `relu`, through a ReLU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Store {
    pub mode: Dst,
    pub relu: bool,
}

impl Store {
    pub const OVERWRITE: Self = Self {
        mode: Dst::Overwrite,
        relu: false,
    };
    pub const ACCUMULATE: Self = Self {
        mode: Dst::Accumulate,
        relu: false,
    };

    /// The stored value for a result `value` and the output's old contents `old`.
    #[inline(always)]
    pub fn apply(self, old: f32, value: f32) -> f32 {
        let sum = match self.mode {
            Dst::Accumulate => old + value,
            Dst::Overwrite => value,
        };
        if self.relu { relu(sum) } else { sum }
    }
}

/// PyTorch's ReLU: negatives to zero, NaN kept.
#[inline(always)]
pub fn relu(x: f32) -> f32 {
    if x < 0.0 { 0.0 } else { x }
}

/// `output = relu?(conv(input) + bias (+ output))`: with `Dst::Accumulate`, `output` holds a
/// residual of the output's shape that the convolution is added to.
///
/// # Shapes
/// output: [batch, channels_out, output_size]
pub fn convolve(output: &mut [f32], store: Store, operands: Operands, g: &Geometry) {
    let [out_h, out_w] = g.output_size();
    let method = match cpu_winograd::choose(g) {
        Some(tile) => Method::Winograd(tile),
        None if g.batch > 1 && g.batch * out_h * out_w <= MERGED_PIXELS => Method::Merged,
        None => Method::Im2col,
    };
    convolve_with(output, store, operands, g, method, BAND_FLOATS);
}

/// How [`convolve_with`] computes the product.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    /// im2col products, one per image and band of rows.
    Im2col,
    /// One im2col product for the whole batch ([`convolve_merged`]).
    Merged,
    Winograd(Tile),
}

fn convolve_with(
    output: &mut [f32],
    store: Store,
    operands: Operands,
    g: &Geometry,
    method: Method,
    band_floats: usize,
) {
    assert!(g.valid(), "empty or impossible convolution {g:?}");
    let Operands {
        input,
        weight,
        bias,
    } = operands;
    let [out_h, out_w] = g.output_size();
    let plane_in = g.height * g.width;
    let plane_out = out_h * out_w;
    let taps = g.kernel * g.kernel;
    let depth = g.channels_in * taps;
    assert_eq!(
        input.len(),
        g.batch * g.channels_in * plane_in,
        "input size"
    );
    assert_eq!(weight.len(), g.channels_out * depth, "weight size");
    assert_eq!(
        output.len(),
        g.batch * g.channels_out * plane_out,
        "output size"
    );

    if let Some(bias) = bias {
        assert_eq!(bias.len(), g.channels_out, "bias size");
    }
    if let Method::Winograd(tile) = method {
        let min_tiles = cpu_winograd::MIN_TILES;
        let width = Width::widest();
        cpu_winograd::convolve(
            tile,
            width,
            output,
            store,
            operands,
            g,
            band_floats,
            min_tiles,
        );
        return;
    }
    let mut mode = store.mode;
    if let Some(bias) = bias {
        output
            .par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(i, plane)| {
                let b = bias[i % g.channels_out];
                match mode {
                    Dst::Accumulate => plane.iter_mut().for_each(|x| *x += b),
                    Dst::Overwrite => plane.fill(b),
                }
            });
        mode = Dst::Accumulate;
    }
    let weights = Matrix::new(weight, g.channels_out, depth, depth);
    if method == Method::Merged {
        convolve_merged(output, mode, input, weights, g);
    } else {
        convolve_in_bands(output, mode, input, weights, g, band_floats);
    }
    if store.relu {
        output
            .par_chunks_mut(plane_out)
            .for_each(|plane| plane.iter_mut().for_each(|x| *x = relu(*x)));
    }
}

/// The im2col path: one product per image and band of rows, onto `output` (see [`Dst`]).
fn convolve_in_bands(
    output: &mut [f32],
    mode: Dst,
    input: &[f32],
    weights: Matrix,
    g: &Geometry,
    band_floats: usize,
) {
    let [out_h, out_w] = g.output_size();
    let plane_in = g.height * g.width;
    let plane_out = out_h * out_w;
    let taps = g.kernel * g.kernel;
    let depth = weights.cols;
    let band_rows = if g.is_pointwise() {
        out_h
    } else {
        (band_floats / (depth * out_w)).clamp(1, out_h)
    };
    // Written in full for each band before it is read.
    let mut columns = cpu_pool::floats(if g.is_pointwise() {
        0
    } else {
        depth * band_rows * out_w
    });
    for (image, out) in input
        .chunks_exact(g.channels_in * plane_in)
        .zip(output.chunks_exact_mut(g.channels_out * plane_out))
    {
        for top in (0..out_h).step_by(band_rows) {
            let rows = band_rows.min(out_h - top);
            let pixels = rows * out_w;
            let patches = if g.is_pointwise() {
                Matrix::new(&image[top * out_w..], g.channels_in, pixels, plane_in)
            } else {
                let columns = &mut columns[..depth * pixels];
                columns
                    .par_chunks_mut(taps * pixels)
                    .zip(image.par_chunks_exact(plane_in))
                    .for_each(|(columns, plane)| im2col(columns, pixels, 0, plane, g, top, rows));
                Matrix::new(columns, depth, pixels, pixels)
            };
            matmul(
                &mut out[top * out_w..],
                plane_out,
                mode,
                weights,
                patches,
                1.0,
                true,
            );
        }
    }
}

/// Output pixels of a whole batch up to which its images share one product ([`Method::Merged`]).
const MERGED_PIXELS: usize = 512;

/// The im2col path for small maps (the UNet's 8² convolutions and 16² shortcuts, with 1280 to 2560
/// channels): one product for the whole batch, the images' im2col matrices side by side, instead
/// of one per image and band of rows. The weights, up to 2560 · 9 · 1280 floats, are read and
/// packed once for the batch, and no product is left a few dozen columns wide (an 8² image with
/// 2560 input channels took two bands, of 40 and 24 pixels). Measured side by side in UNet steps,
/// the 2560-channel 8² convolutions took 15–40% less time; the others moved within the noise.
/// The result is added (or, with `Dst::Overwrite`, copied) into each image's output channels.
fn convolve_merged(output: &mut [f32], mode: Dst, input: &[f32], weights: Matrix, g: &Geometry) {
    let [out_h, out_w] = g.output_size();
    let (plane_in, plane_out) = (g.height * g.width, out_h * out_w);
    let taps = g.kernel * g.kernel;
    let columns_len = g.batch * plane_out;
    // Written in full before it is read.
    let mut columns = cpu_pool::floats(weights.cols * columns_len);
    columns
        .par_chunks_mut(taps * columns_len)
        .enumerate()
        .for_each(|(channel, columns)| {
            for image in 0..g.batch {
                let plane = &input[(image * g.channels_in + channel) * plane_in..][..plane_in];
                im2col(columns, columns_len, image * plane_out, plane, g, 0, out_h);
            }
        });
    let columns = Matrix::new(&columns, weights.cols, columns_len, columns_len);
    let product = product(weights, columns, 1.0, true);
    output
        .par_chunks_mut(plane_out)
        .enumerate()
        .for_each(|(i, plane)| {
            let (image, channel) = (i / g.channels_out, i % g.channels_out);
            let result = &product[channel * columns_len + image * plane_out..][..plane_out];
            match mode {
                Dst::Accumulate => plane.iter_mut().zip(result).for_each(|(x, r)| *x += r),
                Dst::Overwrite => plane.copy_from_slice(result),
            }
        });
}

/// One input channel's `kernel²` rows of the im2col matrix for output rows `top..top + rows`: row
/// (ky, kx) holds, for every output pixel (y, x), the input at (t·y + ky − p, t·x + kx − p), t the
/// stride, in the (possibly upsampled) input, or 0 outside it. The rows are `row_stride` apart in
/// `columns`, and each starts `offset` into its row (where several images share the rows).
fn im2col(
    columns: &mut [f32],
    row_stride: usize,
    offset: usize,
    plane: &[f32],
    g: &Geometry,
    top: usize,
    rows: usize,
) {
    let s = g.scale();
    let [_, out_w] = g.output_size();
    let (in_h, in_w) = (g.height * s, g.width * s);
    let (p, step) = (g.padding, g.stride);
    let pixels = rows * out_w;
    for ky in 0..g.kernel {
        for kx in 0..g.kernel {
            let row = &mut columns[(ky * g.kernel + kx) * row_stride + offset..][..pixels];
            // Output columns whose input column step·x + kx − p lies inside the input.
            let lo = p.saturating_sub(kx).div_ceil(step).min(out_w);
            let hi = (in_w + p)
                .saturating_sub(kx)
                .div_ceil(step)
                .clamp(lo, out_w);
            for (r, dst) in row.chunks_exact_mut(out_w).enumerate() {
                let y = (top + r) * step + ky;
                if y < p || y - p >= in_h {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[(y - p) / s * g.width..][..g.width];
                dst[..lo].fill(0.0);
                dst[hi..].fill(0.0);
                if lo == hi {
                    continue;
                } else if step > 1 {
                    let first = step * lo + kx - p;
                    let values = src[first..].iter().step_by(step);
                    for (d, &x) in dst[lo..hi].iter_mut().zip(values) {
                        *d = x;
                    }
                } else if s == 1 {
                    dst[lo..hi].copy_from_slice(&src[lo + kx - p..hi + kx - p]);
                } else {
                    for (x, d) in (lo..hi).zip(&mut dst[lo..hi]) {
                        *d = src[(x + kx - p) / 2];
                    }
                }
            }
        }
    }
}

/// A CPU tensor's f32 storage, made dense if it is not, and where its elements start in it.
pub(crate) fn flex<const D: usize>(tensor: Tensor<D>) -> (FlexTensor, usize) {
    let tensor = tensor
        .try_into_primitive::<Flex>()
        .expect("a tensor on the CPU backend");
    let tensor = if tensor.layout().contiguous_offsets().is_some() {
        tensor
    } else {
        tensor.to_contiguous()
    };
    let (start, _) = tensor.layout().contiguous_offsets().expect("contiguous");
    assert_eq!(tensor.dtype(), DType::F32, "f32 storage");
    (tensor, start)
}

/// The geometry of `conv(upsample?(x))` when [`run`] can compute it: `x` and the weights are f32
/// on the CPU backend, and the convolution has the same stride both ways (1 where it upsamples),
/// no groups, no dilation and a square kernel with the same padding on every side. `None` leaves
/// it to Burn.
pub fn plan(conv: &Conv2d, x: &Tensor<4>, upsample: bool) -> Option<Geometry> {
    let weight = conv.weight.val();
    if x.device() != Device::flex()
        || x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || conv
            .bias
            .as_ref()
            .is_some_and(|b| b.val().dtype() != DType::F32)
        || conv.stride[0] != conv.stride[1]
        || (upsample && conv.stride[0] != 1)
        || conv.dilation != [1, 1]
        || conv.groups != 1
        || conv.kernel_size[0] != conv.kernel_size[1]
    {
        return None;
    }
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
        PaddingConfig2d::Valid => 0,
        _ => return None,
    };
    let [batch, channels_in, height, width] = x.dims();
    let [channels_out, weight_in, _, _] = weight.dims();
    let g = Geometry {
        batch,
        channels_in,
        height,
        width,
        channels_out,
        kernel: conv.kernel_size[0],
        padding,
        stride: conv.stride[0],
        upsample,
    };
    (weight_in == channels_in && g.valid()).then_some(g)
}

/// `len` zeros, written by every thread of the pool: a 512² decoder layer's output is 64 MiB, and
/// zeroing it (or the kernel clearing its fresh pages) on one thread left the other idle.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    if len < 1 << 20 {
        return vec![0f32; len];
    }
    let mut zeros = Vec::new();
    zeros.par_extend(rayon::iter::repeat_n(0f32, len));
    zeros
}

/// `row` repeated `rows` times (a bias under every row of a product), written by every thread of
/// the pool where it is large, as [`zeros`]: a GEGLU projection's 84 MB output at 64² latents was
/// filled on one thread while the other waited.
pub(crate) fn repeated(row: &[f32], rows: usize) -> Vec<f32> {
    let len = row.len() * rows;
    if len < 1 << 20 {
        return row.repeat(rows);
    }
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(row.len())
        .for_each(|dst| {
            for (dst, &x) in dst.iter_mut().zip(row) {
                dst.write(x);
            }
        });
    #[allow(unsafe_code)]
    // SAFETY: the chunks above cover the first `len` elements, and each has been written.
    unsafe {
        out.set_len(len)
    };
    out
}

/// `relu?(conv(upsample?(x)) (+ residual))` for a geometry from [`plan`]. A residual that nothing
/// else holds becomes the output in place.
pub fn run(
    conv: &Conv2d,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    relu: bool,
    g: &Geometry,
) -> Tensor<4> {
    let device = x.device();
    let [out_h, out_w] = g.output_size();
    let out_shape = [g.batch, g.channels_out, out_h, out_w];
    let (mut output, mode) = match residual {
        Some(residual) => {
            assert_eq!(residual.dims(), out_shape, "residual shape");
            let data = residual.into_data().convert::<f32>();
            (
                data.try_into_vec::<f32>().expect("f32 data"),
                Dst::Accumulate,
            )
        }
        None => (zeros(out_shape.iter().product()), Dst::Overwrite),
    };
    let (input, input_start) = flex(x);
    let (weight, weight_start) = flex(conv.weight.val());
    let bias = conv.bias.as_ref().map(|b| flex(b.val()));
    let operands = Operands {
        input: &input.storage::<f32>()[input_start..]
            [..g.batch * g.channels_in * g.height * g.width],
        weight: &weight.storage::<f32>()[weight_start..]
            [..g.channels_out * g.channels_in * g.kernel * g.kernel],
        bias: bias
            .as_ref()
            .map(|(b, start)| &b.storage::<f32>()[*start..][..g.channels_out]),
    };
    convolve(&mut output, Store { mode, relu }, operands, g);
    Tensor::from_data(TensorData::new(output, out_shape), &device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::module::{conv2d, interpolate};
    use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
    use burn::tensor::{Distribution, activation};

    use crate::models::layers;

    /// Compares with Burn's convolution (after Burn's nearest upsampling) on uneven sizes, with and
    /// without bias, residual and ReLU, by im2col, merged im2col and Winograd.
    #[test]
    fn matches_burns_convolution() {
        let device = Device::flex();
        let n = Distribution::Normal(0.0, 1.0);
        for (batch, c_in, c_out, h, w, k, p, upsample, bias, residual, relu, stride) in [
            (2, 5, 7, 9, 6, 3, 1, false, true, false, true, 1),
            (1, 3, 4, 5, 7, 3, 1, true, true, true, false, 1),
            (2, 6, 3, 4, 4, 1, 0, false, false, true, true, 1),
            (1, 4, 2, 3, 8, 3, 0, false, true, false, false, 1),
            (1, 2, 3, 6, 5, 5, 2, true, false, false, false, 1),
            (1, 64, 8, 40, 33, 3, 1, false, true, true, false, 1),
            (1, 32, 40, 20, 17, 3, 1, true, true, true, true, 1),
            (2, 48, 32, 17, 22, 3, 1, false, false, false, false, 1),
            (1, 128, 128, 17, 32, 3, 1, true, true, true, false, 1),
            (1, 64, 64, 64, 70, 3, 1, false, true, true, true, 1),
            (1, 96, 64, 33, 32, 3, 1, true, true, false, true, 1),
            // Small maps of a batch share one product (merged im2col).
            (3, 4, 5, 5, 6, 3, 1, true, true, true, true, 1),
            (2, 40, 24, 8, 8, 3, 1, false, false, false, false, 1),
            // Strided (downsampling): odd and even sizes, with and without padding, and a batch
            // small enough for one merged product.
            (2, 6, 5, 9, 8, 3, 1, false, true, true, false, 2),
            (1, 16, 24, 33, 32, 3, 1, false, true, false, true, 2),
            (1, 3, 4, 7, 10, 3, 0, false, false, false, false, 2),
            (1, 5, 6, 12, 12, 5, 2, false, true, false, false, 3),
            // Rows and columns that only padding reaches for the outer taps.
            (1, 2, 3, 1, 1, 5, 2, false, true, false, false, 1),
            (1, 2, 3, 1, 2, 5, 2, false, true, false, false, 2),
            (2, 32, 16, 16, 16, 3, 1, false, true, false, false, 2),
            // Five bands of rows.
            (1, 128, 8, 130, 129, 3, 1, false, true, true, false, 2),
        ] {
            let x = Tensor::<4>::random([batch, c_in, h, w], n, &device);
            let weight = Tensor::<4>::random([c_out, c_in, k, k], n, &device);
            let b = bias.then(|| Tensor::<1>::random([c_out], n, &device));
            let mut conv = layers::conv2d([c_in, c_out], k, stride, p, bias, &device);
            conv.weight = Param::from_tensor(weight.clone());
            conv.bias = b.clone().map(Param::from_tensor);

            let input = if upsample {
                interpolate(
                    x.clone(),
                    InterpolateOptions::new(InterpolateMode::Nearest)
                        .with_output_size([2 * h, 2 * w]),
                )
            } else {
                x.clone()
            };
            let mut expected = conv2d(
                input,
                weight,
                b,
                ConvOptions::new([stride, stride], [p, p], [1, 1], 1),
            );
            let res = residual.then(|| Tensor::<4>::random(expected.dims(), n, &device));
            if let Some(r) = &res {
                expected = expected + r.clone();
            }
            if relu {
                expected = activation::relu(expected);
            }
            let g = plan(&conv, &x, upsample).expect("the CPU kernel applies");
            let actual = run(&conv, x, res, relu, &g);
            assert_eq!(actual.dims(), expected.dims());
            // Sums of hundreds of products: f32 rounding grows with their size. F(4×4, 3×3)'s
            // transforms scale by up to 8 and by sixths, which costs it about half a digit more.
            let scale: f32 = expected.clone().abs().max().into_scalar();
            let error: f32 = (actual - expected).abs().max().into_scalar();
            let tolerance = match cpu_winograd::choose(&g) {
                Some(Tile::F4) => 3e-5,
                _ => 1e-5,
            };
            assert!(
                error < tolerance * scale,
                "max error {error} (scale {scale}) for {batch}×{c_in}→{c_out} {h}×{w} k{k}"
            );
        }
    }

    #[test]
    fn outputs_start_as_zeros_of_their_length() {
        for len in [0, 5, (1 << 20) - 1, 1 << 20, (3 << 20) + 7] {
            let zeros = zeros(len);
            assert_eq!(zeros.len(), len);
            assert!(zeros.iter().all(|&x| x == 0.0), "{len} zeros");
        }
    }

    #[test]
    fn upsampled_strided_and_dilated_convolutions_are_left_to_burn() {
        let device = Device::flex();
        let x = Tensor::<4>::zeros([1, 4, 8, 8], &device);
        let strided = layers::conv2d([4, 4], 3, 2, 1, true, &device);
        assert!(plan(&strided, &x, false).is_some());
        assert!(plan(&strided, &x, true).is_none(), "upsampled and strided");
        let mut dilated = layers::conv2d([4, 4], 3, 1, 1, true, &device);
        assert!(plan(&dilated, &x, true).is_some());
        dilated.dilation = [2, 2];
        assert!(plan(&dilated, &x, false).is_none());
    }

    /// Every output is the sum of its 3×3 neighbourhood over both channels, whether the rows are
    /// computed in bands of one, of two (a short last band), or all at once, and whether each
    /// image has its own products or both images share one.
    #[test]
    fn bands_of_any_height_give_the_same_sums() {
        let g = Geometry {
            batch: 2,
            channels_in: 2,
            height: 5,
            width: 4,
            channels_out: 1,
            kernel: 3,
            padding: 1,
            stride: 1,
            upsample: false,
        };
        let input: Vec<f32> = (0..80).map(|i| (i % 7) as f32).collect();
        let at = |b: usize, c: usize, y: isize, x: isize| {
            if (0..5).contains(&y) && (0..4).contains(&x) {
                input[b * 40 + c * 20 + y as usize * 4 + x as usize]
            } else {
                0.0
            }
        };
        let depth_row = 18 * 4;
        for (method, band_floats) in [
            (Method::Im2col, 1),
            (Method::Im2col, 2 * depth_row),
            (Method::Im2col, 100 * depth_row),
            (Method::Merged, 1),
        ] {
            let mut out = vec![0.0; 40];
            let operands = Operands {
                input: &input,
                weight: &[1.0; 18],
                bias: None,
            };
            convolve_with(
                &mut out,
                Store::OVERWRITE,
                operands,
                &g,
                method,
                band_floats,
            );
            for b in 0..2 {
                for y in 0..5isize {
                    for x in 0..4isize {
                        let mut want = 0.0;
                        for c in 0..2 {
                            for dy in -1..=1 {
                                for dx in -1..=1 {
                                    want += at(b, c, y + dy, x + dx);
                                }
                            }
                        }
                        let got = out[b * 20 + (y * 4 + x) as usize];
                        assert_eq!(got, want, "bands of {band_floats}: ({b}, {y}, {x})");
                    }
                }
            }
        }
    }

    /// Winograd's F(2×2, 3×3) and F(4×4, 3×3) against im2col on odd sizes (partial last tiles),
    /// upsampled input, a batch, a residual, bands of one tile row, of several and of all, and
    /// products computed one per thread, shared out over a pool of many threads, and a block of
    /// output channels per thread with their weights transformed just before; added to a
    /// residual and written through a ReLU; with each width of vector registers this CPU has. The
    /// working memory is kept throughout, so later cases run in buffers earlier ones left values in.
    #[test]
    fn winograd_matches_im2col() {
        let _memory = crate::models::cpu_pool::keep_working_memory();
        let many_threads = rayon::ThreadPoolBuilder::new()
            .num_threads(16)
            .build()
            .expect("a thread pool");
        let widths: Vec<Width> = [Width::Portable, Width::Avx, Width::Avx512]
            .into_iter()
            .filter(|&width| width <= Width::widest())
            .collect();
        let mut seed = 1u32;
        let mut random = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
                })
                .collect()
        };
        for (batch, c_in, c_out, height, width, upsample, band_floats) in [
            (1, 3, 5, 7, 9, false, 1),
            (2, 4, 3, 6, 5, true, 1 << 20),
            (1, 8, 8, 11, 4, false, 16 * 8 * 2 * 2),
            (2, 40, 33, 18, 17, false, 1 << 20),
            (3, 16, 24, 9, 13, true, 1 << 24),
            // Rows of several whole groups of 8 and of 16 tiles, and a part of one.
            (1, 6, 7, 5, 70, false, 1 << 20),
            (2, 5, 4, 4, 35, true, 1),
            (1, 4, 6, 5, 11, false, 1 << 20),
            // Products large enough to be shared out over the pool one position at a time.
            (4, 256, 256, 20, 32, false, 1 << 24),
            // Few enough tiles for weights transformed a block of output channels at a time
            // (also (2, 40, 33, 18, 17) by F(4×4, 3×3)): three whole blocks and part of one.
            (2, 21, 200, 6, 5, false, 1 << 20),
            // ... and a slice of input channels at a time, whose products add up: 192, 192 and
            // 66 by F(4×4, 3×3), 432 and 18 by F(2×2, 3×3).
            (2, 450, 70, 4, 4, false, 1 << 20),
        ] {
            let g = Geometry {
                batch,
                channels_in: c_in,
                height,
                width,
                channels_out: c_out,
                kernel: 3,
                padding: 1,
                stride: 1,
                upsample,
            };
            let [h, w] = g.output_size();
            let input = random(batch * c_in * height * width);
            let weight = random(c_out * c_in * 9);
            let bias = random(c_out);
            let residual = random(batch * c_out * h * w);
            let operands = Operands {
                input: &input,
                weight: &weight,
                bias: Some(&bias),
            };
            let relu = Store {
                mode: Dst::Overwrite,
                relu: true,
            };
            for store in [Store::ACCUMULATE, relu] {
                let mut direct = residual.clone();
                convolve_with(&mut direct, store, operands, &g, Method::Im2col, 1 << 20);
                for (tile, width) in [Tile::F2, Tile::F4]
                    .into_iter()
                    .flat_map(|tile| widths.iter().map(move |&width| (tile, width)))
                {
                    // In this pool, and in one of 16 threads: too many for a product each, so
                    // large products are shared out over the pool instead.
                    for pool in [None, Some(&many_threads)] {
                        let mut winograd = residual.clone();
                        let mut run = || {
                            cpu_winograd::convolve(
                                tile,
                                width,
                                &mut winograd,
                                store,
                                operands,
                                &g,
                                band_floats,
                                1,
                            )
                        };
                        match pool {
                            Some(pool) => pool.install(run),
                            None => run(),
                        }
                        let error = direct
                            .iter()
                            .zip(&winograd)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            error < 1e-5 * c_in as f32,
                            "{tile:?} with {width:?} lanes, {store:?}, {pool:?}: max error {error} \
                             for {g:?}"
                        );
                    }
                }
            }
        }
    }
}
