//! Previews of the denoised estimate x̂₀ at each step: a per-pixel linear projection of the four
//! latent channels to RGB (at latent resolution, nearly free), or TAESD's decode when one is loaded.

use burn::tensor::{Tensor, TensorData};
use image::RgbImage;

use crate::imaging::{to_unit_range, unit_tensor_to_image};
use crate::models::taesd::Taesd;

/// x̂₀ of the first image in the batch, `[batch, 4, h, w]`, projected to an `h`×`w` image.
pub fn project(denoised: &Tensor<4>, factors: &[[f32; 3]; 4]) -> RgbImage {
    let [_, channels, h, w] = denoised.dims();
    assert_eq!(channels, 4, "the projection takes 4 latent channels");
    let flat: Vec<f32> = factors.iter().flatten().copied().collect();
    let factors = Tensor::<2>::from_data(TensorData::new(flat, [4, 3]), &denoised.device());
    let rgb = denoised
        .clone()
        .narrow(0, 0, 1)
        .reshape([4, h * w])
        .swap_dims(0, 1)
        .matmul(factors)
        .swap_dims(0, 1)
        .reshape([1, 3, h, w]);
    unit_tensor_to_image(to_unit_range(rgb))
}

/// TAESD's full-resolution decode of x̂₀ (latents as the UNet sees them).
pub fn taesd(taesd: &Taesd, denoised: &Tensor<4>) -> RgbImage {
    unit_tensor_to_image(to_unit_range(
        taesd.decode(denoised.clone().narrow(0, 0, 1)),
    ))
}
