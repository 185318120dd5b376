//! The residual block and the 2× resamplers of diffusers' `resnet.py`, `downsampling.py` and
//! `upsampling.py`, shared by the UNet and the VAE.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, PadMode};
use burn::tensor::{Device, Tensor};

use crate::models::layers::{
    conv2d, convolve, convolve_fused, group_norm, linear, normalize, repeat_batch,
};

/// `ResnetBlock2D`: two norm–SiLU–conv stages, the time embedding added in between when given, and
/// a 1×1 convolution on the shortcut when the channel count changes.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetConfig {
    pub fn init(&self, device: &Device) -> ResnetBlock2D {
        let (i, o) = (self.in_channels, self.out_channels);
        ResnetBlock2D {
            norm1: group_norm(self.groups, i, self.eps, device),
            conv1: conv2d([i, o], 3, 1, 1, true, device),
            time_emb_proj: self.temb_channels.map(|t| linear(t, o, true, device)),
            norm2: group_norm(self.groups, o, self.eps, device),
            conv2: conv2d([o, o], 3, 1, 1, true, device),
            conv_shortcut: (i != o).then(|| conv2d([i, o], 1, 1, 0, true, device)),
        }
    }
}

impl ResnetBlock2D {
    /// # Shapes
    /// x: [batch, in_channels, h, w], temb: [batch or a divisor of it, temb_channels] (repeated
    /// for the copies of a shared latent) → [batch, out_channels, h, w]
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let h = convolve(&self.conv1, normalize(&self.norm1, x.clone(), None, true));
        let time = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                Some(repeat_batch(proj.forward(silu(temb.clone())), x.dims()[0]))
            }
            _ => None,
        };
        let shortcut = match &self.conv_shortcut {
            Some(conv) => convolve(conv, x),
            None => x,
        };
        convolve_fused(
            &self.conv2,
            normalize(&self.norm2, h, time, true),
            false,
            Some(shortcut),
            false,
        )
    }
}

/// `Downsample2D` with a convolution of stride 2. The UNet pads it by one on every side; the VAE pads
/// only the right and bottom edges, by hand.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub asymmetric_padding: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, asymmetric_padding: bool, device: &Device) -> Self {
        let padding = if asymmetric_padding { 0 } else { 1 };
        Self {
            conv: conv2d([channels, channels], 3, 2, padding, true, device),
            asymmetric_padding,
        }
    }

    /// # Shapes
    /// x: [batch, channels, h, w] → [batch, channels, ⌈h/2⌉, ⌈w/2⌉]
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.asymmetric_padding {
            x.pad((0, 1, 0, 1), PadMode::Constant(0.0))
        } else {
            x
        };
        convolve(&self.conv, x)
    }
}

/// `Upsample2D`: nearest-neighbour upscaling followed by a 3×3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self {
            conv: conv2d([channels, channels], 3, 1, 1, true, device),
        }
    }

    /// Upsamples to `size` (the matching skip connection's size in the UNet), or 2× when `None`.
    ///
    /// # Shapes
    /// x: [batch, channels, h, w] → [batch, channels, size or 2h×2w]
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        match size {
            Some(size) if size != [h * 2, w * 2] => {
                let x = interpolate(
                    x,
                    InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
                );
                convolve(&self.conv, x)
            }
            _ => convolve_fused(&self.conv, x, true, None, false),
        }
    }
}
