//! The UNet's down, mid and up blocks (diffusers `unets/unet_2d_blocks.py`): `DownBlock2D` and
//! `CrossAttnDownBlock2D` are one struct whose `attentions` may be empty, likewise the up blocks.

use burn::module::Module;
use burn::tensor::Tensor;

use super::attention::Transformer2DModel;
use super::resnet::{Downsample2D, ResnetBlock2D, Upsample2D};
use crate::models::layers::repeat_batch;

#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

impl DownBlock {
    /// Runs the block, pushing every intermediate state the up path will concatenate back.
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward(x, Some(temb));
            if let Some(attention) = self.attentions.get(i) {
                x = attention.forward(x, context);
            }
            skips.push(x.clone());
        }
        for downsampler in &self.downsamplers {
            x = downsampler.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

impl MidBlock {
    /// `UNetMidBlock2DCrossAttn`: resnet, then attention and resnet pairs.
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = attention.forward(x, context);
            x = resnet.forward(x, Some(temb));
        }
        x
    }
}

impl UpBlock {
    /// Runs the block, consuming skip connections from the end of `skips`.
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip connection per up resnet");
            // A skip from before the first cross-attention is still shared by the CFG branches.
            let batch = x.dims()[0].max(skip.dims()[0]);
            let x_and_skip = vec![repeat_batch(x, batch), repeat_batch(skip, batch)];
            x = resnet.forward(Tensor::cat(x_and_skip, 1), Some(temb));
            if let Some(attention) = self.attentions.get(i) {
                x = attention.forward(x, context);
            }
        }
        for upsampler in &self.upsamplers {
            // Upsample to the next skip's size, so odd latent sizes come back exactly.
            let size = skips.last().map(|s| {
                let [_, _, h, w] = s.dims();
                [h, w]
            });
            x = upsampler.forward(x, size);
        }
        x
    }
}
