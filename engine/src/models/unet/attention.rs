//! The UNet's spatial transformer: diffusers' `Transformer2DModel` (models/transformers/
//! transformer_2d.py) of `BasicTransformerBlock`s with self-attention, cross-attention to the text
//! and a GEGLU feed-forward (models/attention.py).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, LayerNorm, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::{DType, Device, Tensor};

use crate::models::layers::{
    Attention, AttentionConfig, conv2d, convolve, convolve_fused, group_norm, layer_norm,
    layer_normalize, linear, normalize, project, repeat_batch,
};
use crate::models::{cpu_activation, cpu_linear};

/// The projection into and out of the transformer: a 1×1 convolution (SD1) or a linear layer on the
/// flattened pixels (`use_linear_projection`, SD2). Both hold `weight`/`bias` under the same key.
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

/// `FeedForward` with GEGLU: `ff.net.0.proj` and `ff.net.2` in the checkpoint (see `remap.rs`).
#[derive(Module, Debug)]
pub struct FeedForward {
    pub geglu: GeGlu,
    pub out: Linear,
}

#[derive(Module, Debug)]
pub struct GeGlu {
    pub proj: Linear,
}

#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

impl TransformerConfig {
    pub fn init(&self, device: &Device) -> Transformer2DModel {
        let c = self.channels;
        let projection = || {
            if self.linear_projection {
                Projection::Linear(linear(c, c, true, device))
            } else {
                Projection::Conv(conv2d([c, c], 1, 1, 0, true, device))
            }
        };
        let attention = |context_dim| {
            AttentionConfig {
                query_dim: c,
                context_dim,
                heads: self.heads,
                head_dim: c / self.heads,
                qkv_bias: false,
                group_norm: None,
            }
            .init(device)
        };
        let inner = 4 * c;
        Transformer2DModel {
            norm: group_norm(self.groups, c, 1e-6, device),
            proj_in: projection(),
            transformer_blocks: (0..self.layers)
                .map(|_| BasicTransformerBlock {
                    norm1: layer_norm(c, 1e-5, device),
                    attn1: attention(c),
                    norm2: layer_norm(c, 1e-5, device),
                    attn2: attention(self.context_dim),
                    norm3: layer_norm(c, 1e-5, device),
                    ff: FeedForward {
                        geglu: GeGlu {
                            proj: linear(c, 2 * inner, true, device),
                        },
                        out: linear(inner, c, true, device),
                    },
                })
                .collect(),
            proj_out: projection(),
        }
    }
}

impl Transformer2DModel {
    /// # Shapes
    /// x: [batch, channels, h, w], context: [batch · copies, tokens, context_dim]
    /// → [batch · copies, channels, h, w]: a latent shared by several contexts (classifier-free
    /// guidance) is computed once up to the first cross-attention.
    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [_, channels, height, width] = x.dims();
        let to_tokens = |x: Tensor<4>| {
            let batch = x.dims()[0];
            x.reshape([batch, channels, height * width]).swap_dims(1, 2)
        };
        let to_map = |x: Tensor<3>| {
            let batch = x.dims()[0];
            x.swap_dims(1, 2).reshape([batch, channels, height, width])
        };
        let h = normalize(&self.norm, x.clone(), None, false);
        let mut tokens = match (self.proj_in.on_cpu(&h), &self.proj_in) {
            (Some(parameters), _) => cpu_linear::map_to_tokens(&parameters, h),
            (None, Projection::Conv(conv)) => to_tokens(convolve(conv, h)),
            (None, Projection::Linear(linear)) => project(linear, to_tokens(h), None),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context);
        }
        let x = repeat_batch(x, tokens.dims()[0]);
        match (self.proj_out.on_cpu(&x), &self.proj_out) {
            (Some(parameters), _) => cpu_linear::tokens_to_map(&parameters, tokens, x),
            (None, Projection::Conv(conv)) => {
                convolve_fused(conv, to_map(tokens), false, Some(x), false)
            }
            (None, Projection::Linear(linear)) => to_map(project(linear, tokens, None)) + x,
        }
    }
}

impl Projection {
    /// The parameters for the CPU kernels that go between maps and tokens without a transpose,
    /// when `x` and the parameters are f32 on the CPU backend.
    fn on_cpu(&self, x: &Tensor<4>) -> Option<cpu_linear::Parameters> {
        match self {
            Self::Conv(conv) => (x.device() == Device::flex() && x.dtype() == DType::F32)
                .then(|| cpu_linear::Parameters::of_pointwise(conv))
                .flatten(),
            Self::Linear(linear) => {
                cpu_linear::applies(linear, x).then(|| cpu_linear::Parameters::of(linear))
            }
        }
    }
}

impl BasicTransformerBlock {
    fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        let h = layer_normalize(&self.norm1, x.clone());
        let x = self.attn1.forward(h, None, Some(x));
        let x = repeat_batch(x, context.dims()[0]);
        let h = layer_normalize(&self.norm2, x.clone());
        let x = self.attn2.forward(h, Some(context.clone()), Some(x));
        let h = layer_normalize(&self.norm3, x.clone());
        self.ff.forward(h, x)
    }
}

impl FeedForward {
    /// `residual + ff(x)`.
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>) -> Tensor<3> {
        let proj = &self.geglu.proj;
        if cpu_activation::feed_forward_applies(proj, &self.out, &x) {
            return cpu_activation::feed_forward(proj, &self.out, x, residual);
        }
        let [hidden, gate] = proj
            .forward(x)
            .chunk(2, 2)
            .try_into()
            .expect("GEGLU splits in two");
        project(&self.out, hidden * gelu(gate), Some(residual))
    }
}
