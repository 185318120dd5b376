//! Sinusoidal timestep embedding and its MLP, as diffusers' `get_timestep_embedding`,
//! `Timesteps` and `TimestepEmbedding` (models/embeddings.py).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};

use crate::models::layers::linear;

/// `[cos, sin]` (with `flip_sin_to_cos`) of the timesteps at `dim/2` geometric frequencies.
///
/// # Shapes
/// timesteps: [batch] → [batch, dim]
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
    device: &Device,
) -> Tensor<2> {
    let half = dim / 2;
    let mut values = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let angles: Vec<f32> = (0..half)
            .map(|i| {
                // Computed in f32 in the same order as torch: exp(-ln(10000)·i/(half - shift)).
                let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - freq_shift);
                t * exponent.exp()
            })
            .collect();
        let (first, second): (Vec<f32>, Vec<f32>) = if flip_sin_to_cos {
            (
                angles.iter().map(|a| a.cos()).collect(),
                angles.iter().map(|a| a.sin()).collect(),
            )
        } else {
            (
                angles.iter().map(|a| a.sin()).collect(),
                angles.iter().map(|a| a.cos()).collect(),
            )
        };
        values.extend(first);
        values.extend(second);
        values.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    Tensor::from_data(TensorData::new(values, [timesteps.len(), dim]), device)
}

/// `TimestepEmbedding`: linear, SiLU, linear.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_channels: usize, embed_dim: usize, device: &Device) -> Self {
        Self {
            linear_1: linear(in_channels, embed_dim, true, device),
            linear_2: linear(embed_dim, embed_dim, true, device),
        }
    }

    /// # Shapes
    /// x: [batch, in_channels] → [batch, embed_dim]
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}
