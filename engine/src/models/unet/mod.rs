//! diffusers' `UNet2DConditionModel` (models/unets/unet_2d_condition.py) for SD1.x and SD2.x:
//! timestep embedding, a down path storing skip connections, a cross-attention mid block and an up
//! path concatenating them back.

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod resnet;

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use self::attention::TransformerConfig;
use self::blocks::{DownBlock, MidBlock, UpBlock};
use self::embeddings::{TimestepEmbedding, timestep_embedding};
use self::resnet::{Downsample2D, ResnetConfig, Upsample2D};
use crate::models::cpu_pool;
use crate::models::layers::{
    cast, check_groups, conv2d, convolve, group_norm, normalize, repeat_batch,
};

/// A per-block setting that configs give either once for all blocks or as a list.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    All(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize) -> Result<Vec<usize>, String> {
        match self {
            Self::All(value) => Ok(vec![*value; blocks]),
            Self::Each(values) if values.len() == blocks => Ok(values.clone()),
            Self::Each(values) => Err(format!("{} values given for {blocks} blocks", values.len())),
        }
    }
}

/// `unet/config.json`, with the diffusers names and defaults.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub cross_attention_dim: PerBlock,
    /// Read as the number of heads when `num_attention_heads` is absent: diffusers keeps this
    /// historical misnaming for SD1/SD2 configs.
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub transformer_layers_per_block: PerBlock,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub sample_size: usize,
    pub act_fn: String,
    pub addition_embed_type: Option<String>,
    pub class_embed_type: Option<String>,
    pub time_embedding_type: String,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            down_block_types: vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ],
            up_block_types: vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ],
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            cross_attention_dim: PerBlock::All(768),
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::All(1),
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            sample_size: 64,
            act_fn: "silu".into(),
            addition_embed_type: None,
            class_embed_type: None,
            time_embedding_type: "positional".into(),
        }
    }
}

/// What a validated config means for the module tree.
struct Plan {
    heads: Vec<usize>,
    transformer_layers: Vec<usize>,
    cross_attention_dim: usize,
    down_attention: Vec<bool>,
    up_attention: Vec<bool>,
}

impl UNetConfig {
    fn plan(&self) -> Result<Plan, String> {
        let levels = self.block_out_channels.len();
        if levels == 0
            || self.down_block_types.len() != levels
            || self.up_block_types.len() != levels
        {
            return Err("block_out_channels, down_block_types and up_block_types must have the same, non-zero length".into());
        }
        if self.addition_embed_type.is_some() || self.class_embed_type.is_some() {
            return Err("extra conditioning embeddings (SDXL-style) are not supported".into());
        }
        if self.act_fn != "silu" || self.time_embedding_type != "positional" {
            return Err(format!(
                "unsupported act_fn '{}' / time_embedding_type '{}'",
                self.act_fn, self.time_embedding_type
            ));
        }
        let mid = self
            .mid_block_type
            .as_deref()
            .unwrap_or("UNetMidBlock2DCrossAttn");
        if mid != "UNetMidBlock2DCrossAttn" {
            return Err(format!("unsupported mid_block_type '{mid}'"));
        }
        let kinds = |types: &[String], plain: &str, attention: &str| {
            types
                .iter()
                .map(|t| match t.as_str() {
                    t if t == plain => Ok(false),
                    t if t == attention => Ok(true),
                    other => Err(format!("unsupported block type '{other}'")),
                })
                .collect::<Result<Vec<bool>, String>>()
        };
        let cross_attention_dim = match &self.cross_attention_dim {
            PerBlock::All(d) => *d,
            PerBlock::Each(_) => {
                return Err("per-block cross_attention_dim is not supported".into());
            }
        };
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(levels)?;
        for (heads, channels) in heads.iter().zip(&self.block_out_channels) {
            if *heads == 0 || channels % heads != 0 {
                return Err(format!(
                    "{channels} channels cannot be split into {heads} attention heads"
                ));
            }
        }
        check_groups(&self.block_out_channels, self.norm_num_groups)?;
        Ok(Plan {
            heads,
            transformer_layers: self.transformer_layers_per_block.expand(levels)?,
            cross_attention_dim,
            down_attention: kinds(
                &self.down_block_types,
                "DownBlock2D",
                "CrossAttnDownBlock2D",
            )?,
            up_attention: kinds(&self.up_block_types, "UpBlock2D", "CrossAttnUpBlock2D")?,
        })
    }

    /// Checks the config before anything is built.
    pub fn validate(&self) -> Result<(), String> {
        self.plan().map(|_| ())
    }

    /// Width of the text embedding the UNet attends to.
    pub fn context_dim(&self) -> Option<usize> {
        self.plan().ok().map(|p| p.cross_attention_dim)
    }

    /// Builds the module tree (parameters are initialised lazily, so loading weights into it does
    /// not first fill it with random values). Call [`validate`](Self::validate) first.
    pub fn init(&self, device: &Device) -> UNet2DConditionModel {
        let plan = self.plan().expect("validated UNet config");
        let channels = &self.block_out_channels;
        let levels = channels.len();
        let temb = channels[0] * 4;
        let resnet = |i, o| {
            ResnetConfig {
                in_channels: i,
                out_channels: o,
                temb_channels: Some(temb),
                groups: self.norm_num_groups,
                eps: self.norm_eps,
            }
            .init(device)
        };
        let transformer = |level: usize, c| {
            TransformerConfig {
                channels: c,
                heads: plan.heads[level],
                layers: plan.transformer_layers[level],
                context_dim: plan.cross_attention_dim,
                groups: self.norm_num_groups,
                linear_projection: self.use_linear_projection,
            }
            .init(device)
        };

        let mut down_blocks = Vec::with_capacity(levels);
        let mut input = channels[0];
        for (level, &output) in channels.iter().enumerate() {
            let n = self.layers_per_block;
            down_blocks.push(DownBlock {
                resnets: (0..n)
                    .map(|j| resnet(if j == 0 { input } else { output }, output))
                    .collect(),
                attentions: if plan.down_attention[level] {
                    (0..n).map(|_| transformer(level, output)).collect()
                } else {
                    Vec::new()
                },
                downsamplers: if level + 1 < levels {
                    vec![Downsample2D::new(output, false, device)]
                } else {
                    Vec::new()
                },
            });
            input = output;
        }

        let last = levels - 1;
        let mid = channels[last];
        let mid_block = MidBlock {
            resnets: vec![resnet(mid, mid), resnet(mid, mid)],
            attentions: vec![transformer(last, mid)],
        };

        let mut up_blocks = Vec::with_capacity(levels);
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut previous = reversed[0];
        for (i, &output) in reversed.iter().enumerate() {
            let level = last - i;
            let skip_input = reversed[(i + 1).min(last)];
            let n = self.layers_per_block + 1;
            up_blocks.push(UpBlock {
                resnets: (0..n)
                    .map(|j| {
                        let skip = if j == n - 1 { skip_input } else { output };
                        let x = if j == 0 { previous } else { output };
                        resnet(x + skip, output)
                    })
                    .collect(),
                attentions: if plan.up_attention[i] {
                    (0..n).map(|_| transformer(level, output)).collect()
                } else {
                    Vec::new()
                },
                upsamplers: if i < last {
                    vec![Upsample2D::new(output, device)]
                } else {
                    Vec::new()
                },
            });
            previous = output;
        }

        UNet2DConditionModel {
            conv_in: conv2d([self.in_channels, channels[0]], 3, 1, 1, true, device),
            time_embedding: TimestepEmbedding::new(channels[0], temb, device),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(self.norm_num_groups, channels[0], self.norm_eps, device),
            conv_out: conv2d([channels[0], self.out_channels], 3, 1, 1, true, device),
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            in_channels: self.in_channels,
        }
    }
}

impl UNetConfig {
    /// Multiply-adds ×2 of one forward pass for one latent of `height`×`width` attending to
    /// `context` tokens: convolutions, linear layers and attention products (what the benchmark
    /// divides by the time to get an effective rate). Norms and activations are not counted.
    pub fn flops(&self, height: usize, width: usize, context: usize) -> f64 {
        let plan = self.plan().expect("validated UNet config");
        let channels = &self.block_out_channels;
        let temb = channels[0] * 4;
        let conv =
            |i: usize, o: usize, k: usize, pixels: usize| 2.0 * (i * o * k * k * pixels) as f64;
        let resnet = |i: usize, o: usize, pixels: usize| {
            conv(i, o, 3, pixels)
                + conv(o, o, 3, pixels)
                + if i != o { conv(i, o, 1, pixels) } else { 0.0 }
                + 2.0 * (temb * o) as f64
        };
        let transformer = |c: usize, layers: usize, pixels: usize| {
            let d = plan.cross_attention_dim;
            let n = pixels as f64;
            let linear = |i: usize, o: usize, rows: f64| 2.0 * (i * o) as f64 * rows;
            let per_block = linear(c, 3 * c, n)
                + 2.0 * 2.0 * n * n * c as f64
                + linear(c, c, n)
                + linear(c, c, n)
                + linear(d, 2 * c, context as f64)
                + 2.0 * 2.0 * n * context as f64 * c as f64
                + linear(c, c, n)
                + linear(c, 8 * c, n)
                + linear(4 * c, c, n);
            2.0 * linear(c, c, n) + layers as f64 * per_block
        };
        let mut pixels = height * width;
        let mut total = conv(self.in_channels, channels[0], 3, pixels)
            + conv(channels[0], self.out_channels, 3, pixels);
        let levels = channels.len();
        let mut sizes = Vec::new();
        let mut input = channels[0];
        for (level, &output) in channels.iter().enumerate() {
            sizes.push(pixels);
            for j in 0..self.layers_per_block {
                total += resnet(if j == 0 { input } else { output }, output, pixels);
                if plan.down_attention[level] {
                    total += transformer(output, plan.transformer_layers[level], pixels);
                }
            }
            if level + 1 < levels {
                pixels /= 4;
                total += conv(output, output, 3, pixels);
            }
            input = output;
        }
        let mid = channels[levels - 1];
        total += 2.0 * resnet(mid, mid, pixels)
            + transformer(mid, plan.transformer_layers[levels - 1], pixels);
        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut previous = reversed[0];
        for (i, &output) in reversed.iter().enumerate() {
            let level = levels - 1 - i;
            let pixels = sizes[level];
            let skip_input = reversed[(i + 1).min(levels - 1)];
            let n = self.layers_per_block + 1;
            for j in 0..n {
                let skip = if j == n - 1 { skip_input } else { output };
                let x = if j == 0 { previous } else { output };
                total += resnet(x + skip, output, pixels);
                if plan.up_attention[i] {
                    total += transformer(output, plan.transformer_layers[level], pixels);
                }
            }
            if i + 1 < levels {
                total += conv(output, output, 3, sizes[level - 1]);
            }
            previous = output;
        }
        total
    }
}

#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub in_channels: usize,
}

impl UNet2DConditionModel {
    /// Predicts the noise (or v) in `x` at `timesteps`, conditioned on the text `context`.
    ///
    /// A context batch that is a multiple of the latent batch shares the latents among that many
    /// copies of the batch, context `k · batch + i` going with latent `i` (as diffusers'
    /// `torch.cat([latents] * 2)` pairs them with `[uncond, cond]` for classifier-free guidance):
    /// the layers before the first cross-attention then run once, and the result has the
    /// context's batch.
    ///
    /// # Shapes
    /// x: [batch, in_channels, h, w], timesteps: batch values (or one for all),
    /// context: [batch · copies, tokens, cross_attention_dim]
    /// → [batch · copies, out_channels, h, w]
    pub fn forward(&self, x: Tensor<4>, timesteps: &[f32], context: Tensor<3>) -> Tensor<4> {
        let device = x.device();
        cpu_pool::awake(&device, || self.predict(x, timesteps, context))
    }

    fn predict(&self, x: Tensor<4>, timesteps: &[f32], context: Tensor<3>) -> Tensor<4> {
        let [batch, channels, _, _] = x.dims();
        assert_eq!(
            channels, self.in_channels,
            "the UNet takes {} input channels",
            self.in_channels
        );
        let contexts = context.dims()[0];
        assert!(
            batch > 0 && contexts.is_multiple_of(batch),
            "{contexts} contexts cannot share {batch} latents"
        );
        let timesteps: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; batch],
            n if n == batch => timesteps.to_vec(),
            n => panic!("{n} timesteps for a batch of {batch}"),
        };
        // Inputs in the weights' format (f32 or f16); the sinusoids are computed in f32 either
        // way and cast, as diffusers does.
        let dtype = self.conv_in.weight.val().dtype();
        let (x, context) = (cast(x, dtype), cast(context, dtype));
        let dim = self.time_embedding.linear_1.weight.dims()[0];
        let temb = self.time_embedding.forward(cast(
            timestep_embedding(
                &timesteps,
                dim,
                self.flip_sin_to_cos,
                self.freq_shift,
                &x.device(),
            ),
            dtype,
        ));

        let mut x = convolve(&self.conv_in, x);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        x = self.mid_block.forward(x, &temb, &context);
        for block in &self.up_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        let out = convolve(
            &self.conv_out,
            normalize(&self.conv_norm_out, x, None, true),
        );
        cast(repeat_batch(out, contexts), DType::F32)
    }
}
