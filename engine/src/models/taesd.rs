//! TAESD, the tiny autoencoder used for fast previews: diffusers' `AutoencoderTiny`
//! (models/autoencoders/autoencoder_tiny.py, `EncoderTiny`/`DecoderTiny` in vae.py). Its layers are
//! `nn.Sequential`s, mirrored here as vectors of [`TinyLayer`] so checkpoint indices map directly.

use burn::module::Module;
use burn::nn::Relu;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::relu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::cpu_pool;
use super::layers::{cast, conv2d, convolve, convolve_fused};

/// `config.json` of an `AutoencoderTiny`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct TaesdConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    pub latent_channels: usize,
    pub act_fn: String,
    pub upsampling_scaling_factor: usize,
    pub upsample_fn: String,
}

impl Default for TaesdConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_channels: 4,
            act_fn: "relu".into(),
            upsampling_scaling_factor: 2,
            upsample_fn: "nearest".into(),
        }
    }
}

/// One entry of an `nn.Sequential`.
#[derive(Module, Debug)]
pub enum TinyLayer {
    Conv(Conv2d),
    Block(TinyBlock),
    Relu(Relu),
    Upsample(NearestUpsample),
}

/// Nearest-neighbour 2× upscaling (`nn.Upsample(scale_factor=2)`), a layer without parameters.
#[derive(Module, Debug, Default)]
pub struct NearestUpsample;

/// `AutoencoderTinyBlock`: three 3×3 convolutions with ReLUs, a residual, and a ReLU on the sum.
#[derive(Module, Debug)]
pub struct TinyBlock {
    pub conv: Vec<TinyLayer>,
    pub skip: Option<Conv2d>,
}

#[derive(Module, Debug)]
pub struct TinyCoder {
    pub layers: Vec<TinyLayer>,
}

#[derive(Module, Debug)]
pub struct Taesd {
    pub encoder: TinyCoder,
    pub decoder: TinyCoder,
}

impl TaesdConfig {
    pub fn validate(&self) -> Result<(), String> {
        let e = self.encoder_block_out_channels.len();
        let d = self.decoder_block_out_channels.len();
        if e == 0
            || d == 0
            || self.num_encoder_blocks.len() != e
            || self.num_decoder_blocks.len() != d
        {
            return Err("block channel and block count lists must match and not be empty".into());
        }
        if self.act_fn != "relu"
            || self.upsample_fn != "nearest"
            || self.upsampling_scaling_factor != 2
        {
            return Err("only the TAESD layout (ReLU, nearest 2× upsampling) is supported".into());
        }
        Ok(())
    }

    pub fn init(&self, device: &Device) -> Taesd {
        let block = |c: usize| {
            TinyLayer::Block(TinyBlock {
                conv: vec![
                    TinyLayer::Conv(conv2d([c, c], 3, 1, 1, true, device)),
                    TinyLayer::Relu(Relu),
                    TinyLayer::Conv(conv2d([c, c], 3, 1, 1, true, device)),
                    TinyLayer::Relu(Relu),
                    TinyLayer::Conv(conv2d([c, c], 3, 1, 1, true, device)),
                ],
                skip: None,
            })
        };

        let mut encoder = Vec::new();
        let channels = &self.encoder_block_out_channels;
        for (i, (&c, &blocks)) in channels.iter().zip(&self.num_encoder_blocks).enumerate() {
            encoder.push(TinyLayer::Conv(if i == 0 {
                conv2d([self.in_channels, c], 3, 1, 1, true, device)
            } else {
                conv2d([c, c], 3, 2, 1, false, device)
            }));
            encoder.extend((0..blocks).map(|_| block(c)));
        }
        let last = channels[channels.len() - 1];
        encoder.push(TinyLayer::Conv(conv2d(
            [last, self.latent_channels],
            3,
            1,
            1,
            true,
            device,
        )));

        let channels = &self.decoder_block_out_channels;
        let mut decoder = vec![
            TinyLayer::Conv(conv2d(
                [self.latent_channels, channels[0]],
                3,
                1,
                1,
                true,
                device,
            )),
            TinyLayer::Relu(Relu),
        ];
        let last = channels.len() - 1;
        for (i, (&c, &blocks)) in channels.iter().zip(&self.num_decoder_blocks).enumerate() {
            decoder.extend((0..blocks).map(|_| block(c)));
            if i < last {
                decoder.push(TinyLayer::Upsample(NearestUpsample));
            }
            let out = if i < last { c } else { self.out_channels };
            decoder.push(TinyLayer::Conv(conv2d(
                [c, out],
                3,
                1,
                1,
                i == last,
                device,
            )));
        }
        Taesd {
            encoder: TinyCoder { layers: encoder },
            decoder: TinyCoder { layers: decoder },
        }
    }
}

impl TinyLayer {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Conv(conv) => convolve(conv, x),
            Self::Block(block) => {
                let skip = match &block.skip {
                    Some(conv) => convolve(conv, x.clone()),
                    None => x.clone(),
                };
                // The last convolution adds the skip connection and applies the ReLU as it
                // writes its output.
                let (last, inner) = block.conv.split_last().expect("a block has layers");
                match last {
                    Self::Conv(conv) => {
                        convolve_fused(conv, run(inner, x), false, Some(skip), true)
                    }
                    _ => relu(run(&block.conv, x) + skip),
                }
            }
            Self::Relu(_) => relu(x),
            Self::Upsample(_) => {
                let [_, _, h, w] = x.dims();
                interpolate(
                    x,
                    InterpolateOptions::new(InterpolateMode::Nearest)
                        .with_output_size([2 * h, 2 * w]),
                )
            }
        }
    }
}

/// The layers in order; a convolution runs as one fused step with an upsampling before it and a
/// ReLU after it.
fn run(layers: &[TinyLayer], x: Tensor<4>) -> Tensor<4> {
    let mut x = x;
    let mut layers = layers.iter().peekable();
    while let Some(layer) = layers.next() {
        let conv = match (layer, layers.peek()) {
            (TinyLayer::Upsample(_), Some(TinyLayer::Conv(conv))) => {
                layers.next();
                Some((conv, true))
            }
            (TinyLayer::Conv(conv), _) => Some((conv, false)),
            _ => None,
        };
        x = match conv {
            Some((conv, upsample)) => {
                let relu = layers
                    .next_if(|next| matches!(next, TinyLayer::Relu(_)))
                    .is_some();
                convolve_fused(conv, x, upsample, None, relu)
            }
            None => layer.forward(x),
        };
    }
    x
}

impl Taesd {
    /// Latents (scaled, as the UNet sees them) to an image in [-1, 1].
    ///
    /// # Shapes
    /// latents: [batch, 4, h, w] → [batch, 3, 8h, 8w]
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let device = latents.device();
        cpu_pool::awake(&device, || {
            let x = latents.div_scalar(3.0).tanh().mul_scalar(3.0);
            let x = cast(x, self.decoder.dtype());
            let image = run(&self.decoder.layers, x).mul_scalar(2.0).sub_scalar(1.0);
            cast(image, DType::F32)
        })
    }

    /// An image in [-1, 1] to scaled latents.
    ///
    /// # Shapes
    /// image: [batch, 3, h, w] → [batch, 4, h/8, w/8]
    pub fn encode(&self, image: Tensor<4>) -> Tensor<4> {
        let device = image.device();
        cpu_pool::awake(&device, || {
            let x = cast(image.add_scalar(1.0).div_scalar(2.0), self.encoder.dtype());
            cast(run(&self.encoder.layers, x), DType::F32)
        })
    }
}

impl TinyCoder {
    /// The format of the weights (f16 for a half-precision model), which its input is cast to.
    fn dtype(&self) -> DType {
        self.layers
            .iter()
            .find_map(|layer| match layer {
                TinyLayer::Conv(conv) => Some(conv.weight.val().dtype()),
                _ => None,
            })
            .unwrap_or(DType::F32)
    }
}
