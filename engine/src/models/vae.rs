//! The KL autoencoder between pixels and latents: diffusers' `AutoencoderKL`
//! (models/autoencoders/autoencoder_kl.py) with the `Encoder`/`Decoder` of `vae.py`.

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::cpu_pool;
use super::layers::{
    Attention, AttentionConfig, cast, check_groups, conv2d, convolve, group_norm, normalize,
};
use super::unet::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::noise::TorchRng;

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f32,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_add_attention: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
        }
    }
}

const EPS: f64 = 1e-6;

impl VaeConfig {
    pub fn validate(&self) -> Result<(), String> {
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err("block_out_channels is empty".into());
        }
        let all =
            |types: &[String], name: &str| types.len() == levels && types.iter().all(|t| t == name);
        if !all(&self.down_block_types, "DownEncoderBlock2D")
            || !all(&self.up_block_types, "UpDecoderBlock2D")
        {
            return Err(
                "only DownEncoderBlock2D/UpDecoderBlock2D autoencoders are supported".into(),
            );
        }
        if !self.mid_block_add_attention || !self.use_quant_conv || !self.use_post_quant_conv {
            return Err("only the Stable Diffusion autoencoder layout is supported".into());
        }
        check_groups(&self.block_out_channels, self.norm_num_groups)?;
        Ok(())
    }

    /// Pixels per latent along each side: 2 per downsampling level.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    pub fn init(&self, device: &Device) -> AutoencoderKl {
        let channels = &self.block_out_channels;
        let levels = channels.len();
        let groups = self.norm_num_groups;
        let resnet = |i, o| {
            ResnetConfig {
                in_channels: i,
                out_channels: o,
                temb_channels: None,
                groups,
                eps: EPS,
            }
            .init(device)
        };
        let mid = |c| VaeMidBlock {
            resnets: vec![resnet(c, c), resnet(c, c)],
            attentions: vec![
                AttentionConfig {
                    query_dim: c,
                    context_dim: c,
                    heads: 1,
                    head_dim: c,
                    qkv_bias: true,
                    group_norm: Some((groups, EPS)),
                }
                .init(device),
            ],
        };
        let last = channels[levels - 1];

        let mut down_blocks = Vec::with_capacity(levels);
        let mut input = channels[0];
        for (level, &output) in channels.iter().enumerate() {
            down_blocks.push(EncoderBlock {
                resnets: (0..self.layers_per_block)
                    .map(|j| resnet(if j == 0 { input } else { output }, output))
                    .collect(),
                downsamplers: if level + 1 < levels {
                    vec![Downsample2D::new(output, true, device)]
                } else {
                    Vec::new()
                },
            });
            input = output;
        }
        let encoder = Encoder {
            conv_in: conv2d([self.in_channels, channels[0]], 3, 1, 1, true, device),
            down_blocks,
            mid_block: mid(last),
            conv_norm_out: group_norm(groups, last, EPS, device),
            conv_out: conv2d([last, 2 * self.latent_channels], 3, 1, 1, true, device),
        };

        let mut up_blocks = Vec::with_capacity(levels);
        let mut input = last;
        for (i, &output) in channels.iter().rev().enumerate() {
            up_blocks.push(DecoderBlock {
                resnets: (0..=self.layers_per_block)
                    .map(|j| resnet(if j == 0 { input } else { output }, output))
                    .collect(),
                upsamplers: if i + 1 < levels {
                    vec![Upsample2D::new(output, device)]
                } else {
                    Vec::new()
                },
            });
            input = output;
        }
        let decoder = Decoder {
            conv_in: conv2d([self.latent_channels, last], 3, 1, 1, true, device),
            mid_block: mid(last),
            up_blocks,
            conv_norm_out: group_norm(groups, channels[0], EPS, device),
            conv_out: conv2d([channels[0], self.out_channels], 3, 1, 1, true, device),
        };

        let z = self.latent_channels;
        AutoencoderKl {
            encoder,
            decoder,
            quant_conv: conv2d([2 * z, 2 * z], 1, 1, 0, true, device),
            post_quant_conv: conv2d([z, z], 1, 1, 0, true, device),
        }
    }
}

#[derive(Module, Debug)]
pub struct AutoencoderKl {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Conv2d,
    pub post_quant_conv: Conv2d,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// `DownEncoderBlock2D`.
#[derive(Module, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

/// `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

/// `UNetMidBlock2D` with spatial self-attention.
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
}

impl VaeMidBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attention.forward_spatial(x), None);
        }
        x
    }
}

/// The encoder's Gaussian over latents (`DiagonalGaussianDistribution`).
pub struct LatentDistribution {
    pub mean: Tensor<4>,
    pub std: Tensor<4>,
}

impl LatentDistribution {
    /// `mean + std·ε` with ε drawn from `rng` as torch draws `randn_tensor`.
    pub fn sample(&self, rng: &mut TorchRng) -> Tensor<4> {
        let shape = self.mean.dims();
        let noise = Tensor::<1>::from_floats(
            rng.randn(shape.iter().product()).as_slice(),
            &self.mean.device(),
        )
        .reshape(shape);
        self.mean.clone() + self.std.clone() * noise
    }
}

impl AutoencoderKl {
    /// # Shapes
    /// image: [batch, 3, h, w] in [-1, 1] → latents [batch, latent, h/f, w/f] (unscaled)
    pub fn encode(&self, image: Tensor<4>) -> LatentDistribution {
        let device = image.device();
        cpu_pool::awake(&device, || self.encode_moments(image))
    }

    fn encode_moments(&self, image: Tensor<4>) -> LatentDistribution {
        let e = &self.encoder;
        let image = cast(image, e.conv_in.weight.val().dtype());
        let mut x = convolve(&e.conv_in, image);
        for block in &e.down_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            for downsampler in &block.downsamplers {
                x = downsampler.forward(x);
            }
        }
        let x = e.mid_block.forward(x);
        let x = convolve(&e.conv_out, normalize(&e.conv_norm_out, x, None, true));
        let moments = cast(convolve(&self.quant_conv, x), DType::F32);
        let [mean, logvar] = moments.chunk(2, 1).try_into().expect("two halves");
        let std = logvar.clamp(-30.0, 20.0).mul_scalar(0.5).exp();
        LatentDistribution { mean, std }
    }

    /// # Shapes
    /// latents: [batch, latent, h, w] (unscaled) → image [batch, 3, h·f, w·f], roughly in [-1, 1]
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let device = latents.device();
        cpu_pool::awake(&device, || self.decode_pixels(latents))
    }

    fn decode_pixels(&self, latents: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let latents = cast(latents, self.post_quant_conv.weight.val().dtype());
        let x = convolve(&d.conv_in, convolve(&self.post_quant_conv, latents));
        let mut x = d.mid_block.forward(x);
        for block in &d.up_blocks {
            for resnet in &block.resnets {
                x = resnet.forward(x, None);
            }
            for upsampler in &block.upsamplers {
                x = upsampler.forward(x, None);
            }
        }
        let image = convolve(&d.conv_out, normalize(&d.conv_norm_out, x, None, true));
        cast(image, DType::F32)
    }
}
