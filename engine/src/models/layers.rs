//! Building blocks shared by the CLIP, UNet and VAE modules: layer constructors with PyTorch's
//! defaults, diffusers' `Attention` (attention_processor.py) and multi-head scaled dot-product
//! attention on Burn's fused `attention` op.

use burn::module::{Module, ModuleMapper, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::module::{attention, interpolate};
use burn::tensor::ops::{AttentionModuleOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{DType, Device, Tensor, activation};

use super::{cpu_conv, cpu_linear, cpu_norm, gpu_conv};

/// A `k×k` convolution with symmetric `padding`.
pub fn conv2d(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_bias(bias)
        .init(device)
}

/// `conv(x)`, through the CPU convolution kernel where it applies.
pub fn convolve(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    convolve_fused(conv, x, false, None, false)
}

/// `relu?(conv(upsample?(x)) + residual?)`: a nearest 2× upsampling in front, a residual added
/// after and a ReLU on the sum, folded into the CPU convolution kernel where it applies.
pub fn convolve_fused(
    conv: &Conv2d,
    x: Tensor<4>,
    upsample: bool,
    residual: Option<Tensor<4>>,
    relu: bool,
) -> Tensor<4> {
    if let Some(geometry) = cpu_conv::plan(conv, &x, upsample) {
        return cpu_conv::run(conv, x, residual, relu, &geometry);
    }
    let x = if upsample {
        let [_, _, h, w] = x.dims();
        interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
        )
    } else {
        x
    };
    let y = match gpu_conv::applies(&x)
        .then(|| gpu_conv::convolve(conv, x.clone(), &gpu_conv::GPU))
        .flatten()
    {
        Some(y) => y,
        None => summing_in_f32(conv, x, |conv, x| conv.forward(x)),
    };
    let y = match residual {
        Some(residual) => residual + y,
        None => y,
    };
    if relu { activation::relu(y) } else { y }
}

/// `forward(module, x)` computed in f32 when `x` is in half precision, and narrowed back. The GPU's
/// convolutions and norms sum in the tensors' own format, and f16 sums lose digits or overflow
/// (past 65504): a UNet's convolutions summed in f16 put 1% errors into its output (the test model:
/// 1.1% of its largest value, against 0.2% for diffusers in f16, which sums in f32 as Burn's matrix
/// products do), and a GroupNorm over 16 384 values averaging 5 overflows. So these layers widen
/// their input and parameters for the sum; the weights stay f16 in memory.
pub fn summing_in_f32<M: Module + Clone, const D: usize>(
    module: &M,
    x: Tensor<D>,
    forward: impl FnOnce(&M, Tensor<D>) -> Tensor<D>,
) -> Tensor<D> {
    let dtype = x.dtype();
    if !matches!(dtype, DType::F16 | DType::BF16) {
        return forward(module, x);
    }
    let wide = module.clone().map(&mut Widen);
    cast(forward(&wide, cast(x, DType::F32)), dtype)
}

/// Casts every float parameter of a module to f32.
struct Widen;

impl ModuleMapper for Widen {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| cast(t, DType::F32))
    }
}

/// A layer norm, summed in f32 for half-precision input (see [`summing_in_f32`]).
pub fn layer_normalize<const D: usize>(norm: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    summing_in_f32(norm, x, |norm, x| norm.forward(x))
}

/// `silu?(norm(x + shift))` with `shift` one value per (batch, channel), in one CPU kernel where it
/// applies.
///
/// # Shapes
/// x: [batch, channels, …]; shift: [batch, channels]
pub fn normalize<const D: usize>(
    norm: &GroupNorm,
    x: Tensor<D>,
    shift: Option<Tensor<2>>,
    silu: bool,
) -> Tensor<D> {
    if let Some(y) = cpu_norm::forward(norm, &x, shift.as_ref(), silu) {
        return y;
    }
    let x = match shift {
        Some(shift) => {
            let mut shape = [1; D];
            shape[..2].copy_from_slice(&shift.dims());
            x + shift.reshape(shape)
        }
        None => x,
    };
    let y = summing_in_f32(norm, x, |norm, x| {
        if !gpu_conv::group_norm_applies(norm, &x) {
            return norm.forward(x);
        }
        let dims = x.dims();
        let [b, c, h, w] = [0, 1, 2, 3].map(|i| dims[i]);
        gpu_conv::group_norm(norm, x.reshape([b, c, h, w])).reshape(dims)
    });
    if silu { activation::silu(y) } else { y }
}

/// `x` with its batch repeated until it holds `batch` entries. Classifier-free guidance gives the
/// UNet one latent for several text contexts; layers before the first cross-attention compute it
/// once, and this hands the shared state to the layers that tell the branches apart.
pub fn repeat_batch<const D: usize>(x: Tensor<D>, batch: usize) -> Tensor<D> {
    let have = x.dims()[0];
    if have == batch {
        return x;
    }
    assert!(
        have > 0 && batch.is_multiple_of(have),
        "a batch of {have} cannot be shared by {batch}"
    );
    Tensor::cat(vec![x; batch / have], 0)
}

/// `linear(x) (+ residual)`, by the CPU linear kernel where it applies.
pub fn project<const D: usize>(
    linear: &Linear,
    x: Tensor<D>,
    residual: Option<Tensor<D>>,
) -> Tensor<D> {
    if cpu_linear::applies(linear, &x) {
        return cpu_linear::run(linear, x, residual);
    }
    let y = linear.forward(x);
    match residual {
        Some(residual) => y + residual,
        None => y,
    }
}

pub fn linear(d_input: usize, d_output: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_input, d_output)
        .with_bias(bias)
        .init(device)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// Group norms need every level's channel count to split into `groups` equal groups.
pub fn check_groups(channels: &[usize], groups: usize) -> Result<(), String> {
    match channels.iter().find(|&&c| groups == 0 || c % groups != 0) {
        Some(c) => Err(format!(
            "{c} channels cannot be split into {groups} norm groups"
        )),
        None => Ok(()),
    }
}

pub fn layer_norm(dim: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim).with_epsilon(eps).init(device)
}

/// Multi-head scaled dot-product attention, softmax(QKᵀ/√d)V.
///
/// # Shapes
/// q: [batch, len_q, heads·d], k and v: [batch, len_kv, heads·d] → [batch, len_q, heads·d]
pub fn multi_head_attention(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    causal: bool,
) -> Tensor<3> {
    let [batch, len_q, width] = q.dims();
    let len_kv = k.dims()[1];
    assert_eq!(
        k.dims(),
        [batch, len_kv, width],
        "key shape differs from query"
    );
    assert_eq!(
        v.dims(),
        [batch, len_kv, width],
        "value shape differs from key"
    );
    assert_eq!(
        width % heads,
        0,
        "width {width} not divisible by {heads} heads"
    );
    if !causal
        && q.device() == Device::flex()
        && q.dtype() == DType::F32
        && super::cpu_attention::worthwhile(len_q, len_kv)
    {
        return super::cpu_attention::attention(q, k, v, heads);
    }
    attention_in_query_blocks(q, k, v, heads, causal, SCORES_PER_CALL)
}

/// The most attention scores (batch × heads × queries × keys) one call to Burn's attention
/// computes at once: 256 MB in f32. Off the CPU kernel, Burn's attention (without its autotune
/// feature) writes out the whole score matrix and intermediates of its size, which at 512² with
/// guidance would be 268 M scores per call (1 GB in f16, several times over) and at 1024² 4.3 G.
pub const SCORES_PER_CALL: usize = 1 << 26;

/// Multi-head attention by Burn's `attention`, in blocks of queries holding at most `max_scores`
/// scores each (blocks of equal size, at least one query each). Causal attention is never split:
/// its mask is laid out for the whole score matrix (CLIP's 77 tokens need no split).
pub fn attention_in_query_blocks(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    causal: bool,
    max_scores: usize,
) -> Tensor<3> {
    let [batch, len_q, width] = q.dims();
    let len_kv = k.dims()[1];
    let split = |x: Tensor<3>, len: usize| {
        x.reshape([batch, len, heads, width / heads])
            .swap_dims(1, 2)
    };
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    };
    let (q, k, v) = (split(q, len_q), split(k, len_kv), split(v, len_kv));
    let per_query = (batch * heads * len_kv).max(1);
    let blocks = if causal {
        1
    } else {
        len_q.div_ceil((max_scores / per_query).max(1))
    };
    let out = if blocks <= 1 {
        attention(q, k, v, None, None, options)
    } else {
        let rows = len_q.div_ceil(blocks);
        let parts = (0..len_q)
            .step_by(rows)
            .map(|start| {
                let block = q.clone().slice([
                    0..batch,
                    0..heads,
                    start..(start + rows).min(len_q),
                    0..width / heads,
                ]);
                attention(block, k.clone(), v.clone(), None, None, options)
            })
            .collect();
        Tensor::cat(parts, 2)
    };
    out.swap_dims(1, 2).reshape([batch, len_q, width])
}

/// diffusers' `Attention`: q/k/v projections, multi-head attention, an output projection, and for
/// the VAE's spatial attention a group norm in front and the residual added back.
#[derive(Module, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0` in the checkpoint (`to_out.1` is a parameterless dropout).
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

/// How an [`Attention`] is shaped.
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the context attended to (the text embedding for cross-attention).
    pub context_dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// q/k/v carry a bias (the VAE) or not (the UNet transformer blocks).
    pub qkv_bias: bool,
    /// Groups and epsilon of the spatial group norm (the VAE's mid-block attention).
    pub group_norm: Option<(usize, f64)>,
}

impl AttentionConfig {
    pub fn init(&self, device: &Device) -> Attention {
        let inner = self.heads * self.head_dim;
        Attention {
            group_norm: self
                .group_norm
                .map(|(groups, eps)| group_norm(groups, self.query_dim, eps, device)),
            to_q: linear(self.query_dim, inner, self.qkv_bias, device),
            to_k: linear(self.context_dim, inner, self.qkv_bias, device),
            to_v: linear(self.context_dim, inner, self.qkv_bias, device),
            to_out: vec![linear(inner, self.query_dim, true, device)],
            heads: self.heads,
        }
    }
}

impl Attention {
    /// Token attention: self-attention when `context` is `None`, with `residual` added to the
    /// output projection's result.
    ///
    /// # Shapes
    /// x: [batch, tokens, query_dim], context: [batch, context_tokens, context_dim],
    /// residual: [batch, tokens, query_dim] → [batch, tokens, query_dim]
    pub fn forward(
        &self,
        x: Tensor<3>,
        context: Option<Tensor<3>>,
        residual: Option<Tensor<3>>,
    ) -> Tensor<3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = project(&self.to_q, x, None);
        let k = project(&self.to_k, context.clone(), None);
        let v = project(&self.to_v, context, None);
        let out = multi_head_attention(q, k, v, self.heads, false);
        project(&self.to_out[0], out, residual)
    }

    /// Spatial self-attention over the pixels of a feature map, with the residual added back (the
    /// VAE mid-block attention).
    ///
    /// # Shapes
    /// x: [batch, channels, height, width] → same
    pub fn forward_spatial(&self, x: Tensor<4>) -> Tensor<4> {
        let [batch, channels, height, width] = x.dims();
        let norm = self
            .group_norm
            .as_ref()
            .expect("spatial attention has a group norm");
        let tokens = normalize(norm, x.clone(), None, false)
            .reshape([batch, channels, height * width])
            .swap_dims(1, 2);
        let out = self
            .forward(tokens, None, None)
            .swap_dims(1, 2)
            .reshape([batch, channels, height, width]);
        out + x
    }
}

/// `x` in `dtype`. A half-precision model casts its inputs to its weights' format on the way in
/// and its outputs to f32 on the way out, so everything around the models stays f32.
pub fn cast<const D: usize>(x: Tensor<D>, dtype: DType) -> Tensor<D> {
    if x.dtype() == dtype { x } else { x.cast(dtype) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    #[test]
    fn attention_in_query_blocks_matches_one_call() {
        let device = Device::flex();
        let random =
            |shape: [usize; 3]| Tensor::random(shape, Distribution::Normal(0.0, 1.0), &device);
        // 37 queries: blocks of 13, 13 and 11 with a budget of 13 queries' scores; of one query
        // with a budget below one query's.
        let (q, k, v) = (
            random([2, 37, 24]),
            random([2, 29, 24]),
            random([2, 29, 24]),
        );
        let per_query = 2 * 3 * 29;
        let whole =
            attention_in_query_blocks(q.clone(), k.clone(), v.clone(), 3, false, usize::MAX);
        assert_eq!(whole.dims(), [2, 37, 24]);
        let independent =
            super::super::cpu_attention::attention(q.clone(), k.clone(), v.clone(), 3);
        let difference = |a: Tensor<3>, b: Tensor<3>| -> f32 { (a - b).abs().max().into_scalar() };
        assert!(difference(whole.clone(), independent) < 1e-5);
        for budget in [13 * per_query, 13 * per_query + 5, 1] {
            let blocks =
                attention_in_query_blocks(q.clone(), k.clone(), v.clone(), 3, false, budget);
            let error = difference(blocks, whole.clone());
            assert!(error < 1e-6, "budget {budget}: off by {error}");
        }
    }
}
