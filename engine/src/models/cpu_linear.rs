//! Linear layers for the CPU backend: `x · W + b (+ residual)` as one matrix product written into
//! the output's own buffer. Burn's CPU matmul zero-fills a byte buffer, copies it into an aligned
//! one and then writes the product over it, and the bias and a residual are two more passes; here
//! the product adds onto the bias, or onto the residual plus the bias, in place. The same product
//! turns a feature map into tokens and back (a transformer's 1×1 convolution or linear projection
//! in and out) reading and writing NCHW directly, so the map is never transposed by a copy.

use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};
use burn::tensor::{DType, Device, Tensor, TensorData};
use burn_flex::FlexTensor;

use rayon::prelude::*;

use super::cpu_conv::{flex, repeated};
use super::cpu_gemm::{Dst, Matrix, matmul, product};

/// Whether [`run`] can compute `linear(x)`: `x` and the parameters are f32 on the CPU backend.
pub fn applies<const D: usize>(linear: &Linear, x: &Tensor<D>) -> bool {
    f32_on_cpu(x)
        && f32_on_cpu(&linear.weight.val())
        && linear.bias.as_ref().is_none_or(|b| f32_on_cpu(&b.val()))
}

fn f32_on_cpu<const D: usize>(t: &Tensor<D>) -> bool {
    t.device() == Device::flex() && t.dtype() == DType::F32
}

/// `linear(x) (+ residual)` for an `x` that [`applies`]. A residual that nothing else holds becomes
/// the output in place.
///
/// # Shapes
/// x: [..., d_input], residual: [..., d_output] → [..., d_output]
pub fn run<const D: usize>(
    linear: &Linear,
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
) -> Tensor<D> {
    let mut shape = x.dims();
    let d_input = shape[D - 1];
    let rows: usize = shape[..D - 1].iter().product();
    shape[D - 1] = linear.weight.dims()[1];
    let (x, start) = flex(x);
    let x = &x.storage::<f32>()[start..][..rows * d_input];
    apply(
        linear,
        Matrix::new(x, rows, d_input, d_input),
        shape,
        residual,
    )
}

/// `lhs · W + b (+ residual)` for the rows of `lhs` (which may lie anywhere, at any row stride), as
/// a tensor of `shape`: [..., d_output] with `lhs.rows` rows.
pub(crate) fn apply<const D: usize>(
    linear: &Linear,
    lhs: Matrix,
    shape: [usize; D],
    residual: Option<Tensor<D>>,
) -> Tensor<D> {
    let parameters = Parameters::of(linear);
    let (weight, bias) = (parameters.weight(), parameters.bias());
    let d_output = weight.cols;
    assert_eq!(lhs.cols, weight.rows, "input width");
    assert_eq!(shape[D - 1], d_output, "output width");
    assert_eq!(
        shape[..D - 1].iter().product::<usize>(),
        lhs.rows,
        "output rows"
    );
    let output = match (residual, bias) {
        (None, None) => product(lhs, weight, 1.0, true),
        (residual, bias) => {
            let mut output = match residual {
                Some(residual) => {
                    assert_eq!(residual.dims(), shape, "residual shape");
                    let mut output = residual
                        .into_data()
                        .convert::<f32>()
                        .try_into_vec::<f32>()
                        .expect("f32 data");
                    if let Some(bias) = bias {
                        output
                            .par_chunks_exact_mut(d_output)
                            .for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
                    }
                    output
                }
                None => repeated(bias.expect("a bias"), lhs.rows),
            };
            matmul(
                &mut output,
                d_output,
                Dst::Accumulate,
                lhs,
                weight,
                1.0,
                true,
            );
            output
        }
    };
    Tensor::from_data(TensorData::new(output, shape), &Device::flex())
}

/// A channel-mixing layer's parameters in the CPU backend's memory: a linear layer's, or a 1×1
/// convolution's, which is the same map over each pixel's channels with its weight transposed.
pub(crate) struct Parameters {
    weight: (FlexTensor, usize),
    bias: Option<(FlexTensor, usize)>,
    inputs: usize,
    outputs: usize,
    /// The weight is stored [outputs, inputs] (a convolution's), not [inputs, outputs].
    outputs_first: bool,
}

impl Parameters {
    /// A linear layer's, for one that [`applies`].
    pub fn of(linear: &Linear) -> Self {
        let [inputs, outputs] = linear.weight.dims();
        Self {
            weight: flex(linear.weight.val()),
            bias: linear.bias.as_ref().map(|b| flex(b.val())),
            inputs,
            outputs,
            outputs_first: false,
        }
    }

    /// A 1×1 convolution's (stride 1, no padding, dilation or groups) with f32 parameters on the
    /// CPU backend; `None` for any other.
    pub fn of_pointwise(conv: &Conv2d) -> Option<Self> {
        let weight = conv.weight.val();
        let [outputs, inputs, kh, kw] = weight.dims();
        let pointwise = [kh, kw, conv.stride[0], conv.stride[1]] == [1; 4]
            && conv.dilation == [1, 1]
            && conv.groups == 1
            && matches!(
                conv.padding,
                PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
            );
        (pointwise
            && f32_on_cpu(&weight)
            && conv.bias.as_ref().is_none_or(|b| f32_on_cpu(&b.val())))
        .then(|| Self {
            weight: flex(weight),
            bias: conv.bias.as_ref().map(|b| flex(b.val())),
            inputs,
            outputs,
            outputs_first: true,
        })
    }

    fn values(&self) -> &[f32] {
        let (weight, start) = &self.weight;
        &weight.storage::<f32>()[*start..][..self.inputs * self.outputs]
    }

    /// The `[inputs, outputs]` right operand of `x · W`.
    pub fn weight(&self) -> Matrix<'_> {
        let (inputs, outputs) = (self.inputs, self.outputs);
        if self.outputs_first {
            Matrix::transpose_of(self.values(), inputs, outputs, inputs)
        } else {
            Matrix::new(self.values(), inputs, outputs, outputs)
        }
    }

    /// The `[outputs, inputs]` left operand of `Wᵀ · x`, for inputs that are columns.
    pub fn weight_transposed(&self) -> Matrix<'_> {
        let (inputs, outputs) = (self.inputs, self.outputs);
        if self.outputs_first {
            Matrix::new(self.values(), outputs, inputs, inputs)
        } else {
            Matrix::transpose_of(self.values(), outputs, inputs, outputs)
        }
    }

    pub fn bias(&self) -> Option<&[f32]> {
        let (bias, start) = self.bias.as_ref()?;
        Some(&bias.storage::<f32>()[*start..][..self.outputs])
    }
}

/// A feature map's pixels as tokens, mixed by `parameters`: `x · W + b` for every pixel's channels,
/// read straight from NCHW and written as [batch, pixels, outputs], so the map is never transposed
/// into tokens first (the way into a UNet transformer).
///
/// # Shapes
/// x: [batch, inputs, height, width] → [batch, height · width, outputs]
pub(crate) fn map_to_tokens(parameters: &Parameters, x: Tensor<4>) -> Tensor<3> {
    let [batch, inputs, height, width] = x.dims();
    assert_eq!(inputs, parameters.inputs, "input channels");
    let (pixels, outputs) = (height * width, parameters.outputs);
    let (x, start) = flex(x);
    let x = &x.storage::<f32>()[start..][..batch * inputs * pixels];
    let mut tokens = match parameters.bias() {
        Some(bias) => repeated(bias, batch * pixels),
        None => vec![0.0; batch * pixels * outputs],
    };
    for (tokens, image) in tokens
        .chunks_exact_mut(pixels * outputs)
        .zip(x.chunks_exact(inputs * pixels))
    {
        let image = Matrix::transpose_of(image, pixels, inputs, pixels);
        let weight = parameters.weight();
        matmul(tokens, outputs, Dst::Accumulate, image, weight, 1.0, true);
    }
    let shape = [batch, pixels, outputs];
    Tensor::from_data(TensorData::new(tokens, shape), &Device::flex())
}

/// Tokens back into a feature map of `residual`'s shape, mixed by `parameters` and added to the
/// residual: `residual + Wᵀ · tokensᵀ + b`, written straight into NCHW (the way out of a UNet
/// transformer). A residual that nothing else holds becomes the output in place.
///
/// # Shapes
/// tokens: [batch, height · width, inputs], residual: [batch, outputs, height, width] → residual's
pub(crate) fn tokens_to_map(
    parameters: &Parameters,
    tokens: Tensor<3>,
    residual: Tensor<4>,
) -> Tensor<4> {
    let [batch, pixels, inputs] = tokens.dims();
    let shape = residual.dims();
    let outputs = parameters.outputs;
    assert_eq!(inputs, parameters.inputs, "input channels");
    assert_eq!(
        shape,
        [batch, outputs, shape[2], shape[3]],
        "residual shape"
    );
    assert_eq!(shape[2] * shape[3], pixels, "pixels");
    let (tokens, start) = flex(tokens);
    let tokens = &tokens.storage::<f32>()[start..][..batch * pixels * inputs];
    let mut map = residual
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 data");
    if let Some(bias) = parameters.bias() {
        for (plane, b) in map.chunks_exact_mut(pixels).zip(bias.iter().cycle()) {
            plane.iter_mut().for_each(|y| *y += b);
        }
    }
    for (map, tokens) in map
        .chunks_exact_mut(outputs * pixels)
        .zip(tokens.chunks_exact(pixels * inputs))
    {
        let columns = Matrix::transpose_of(tokens, inputs, pixels, inputs);
        let weight = parameters.weight_transposed();
        matmul(map, pixels, Dst::Accumulate, weight, columns, 1.0, true);
    }
    Tensor::from_data(TensorData::new(map, shape), &Device::flex())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    use crate::models::layers::{conv2d, linear};

    fn values(t: Tensor<3>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Against Burn's own linear layer, with and without bias and residual, on a 3-d input.
    #[test]
    fn matches_burns_linear() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<3>::random([2, 37, 24], normal, &device);
        let residual = Tensor::<3>::random([2, 37, 40], normal, &device);
        for bias in [false, true] {
            let layer = linear(24, 40, bias, &device);
            assert!(applies(&layer, &x));
            let expected = layer.forward(x.clone());
            for residual in [None, Some(residual.clone())] {
                let expected = match &residual {
                    Some(r) => expected.clone() + r.clone(),
                    None => expected.clone(),
                };
                assert_close(run(&layer, x.clone(), residual), expected);
            }
        }
    }

    /// A 1×1 convolution and a linear layer, each into tokens and back out onto a residual,
    /// against Burn's convolution or linear layer with the transposes written out.
    #[test]
    fn maps_to_tokens_and_back() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let (batch, inputs, outputs, height, width) = (2, 12, 20, 5, 7);
        let pixels = height * width;
        let x = Tensor::<4>::random([batch, inputs, height, width], normal, &device);
        let residual = Tensor::<4>::random([batch, outputs, height, width], normal, &device);
        let tokens = Tensor::<3>::random([batch, pixels, inputs], normal, &device);
        let to_tokens = |m: Tensor<4>, c| m.reshape([batch, c, pixels]).swap_dims(1, 2);
        let to_map = |t: Tensor<3>, c| t.swap_dims(1, 2).reshape([batch, c, height, width]);

        let conv = conv2d([inputs, outputs], 1, 1, 0, true, &device);
        let parameters = Parameters::of_pointwise(&conv).expect("a pointwise convolution");
        let expected = to_tokens(conv.forward(x.clone()), outputs);
        assert_close(map_to_tokens(&parameters, x.clone()), expected);
        let conv_back = conv2d([inputs, outputs], 1, 1, 0, true, &device);
        let parameters = Parameters::of_pointwise(&conv_back).unwrap();
        let expected = conv_back.forward(to_map(tokens.clone(), inputs)) + residual.clone();
        let got = tokens_to_map(&parameters, tokens.clone(), residual.clone());
        assert_close(to_tokens(got, outputs), to_tokens(expected, outputs));

        let layer = linear(inputs, outputs, true, &device);
        let parameters = Parameters::of(&layer);
        let expected = layer.forward(to_tokens(x.clone(), inputs));
        assert_close(map_to_tokens(&parameters, x), expected);
        let expected = to_map(layer.forward(tokens.clone()), outputs) + residual.clone();
        let got = tokens_to_map(&parameters, tokens, residual);
        assert_close(to_tokens(got, outputs), to_tokens(expected, outputs));

        assert!(
            Parameters::of_pointwise(&conv2d([inputs, outputs], 3, 1, 1, true, &device)).is_none()
        );
    }

    fn assert_close(got: Tensor<3>, expected: Tensor<3>) {
        assert_eq!(got.dims(), expected.dims());
        let (got, expected) = (values(got), values(expected));
        let error = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(error < 1e-5, "max error {error}");
    }
}
