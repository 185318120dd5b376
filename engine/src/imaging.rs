//! Pixels in and out of the pipeline: images to and from tensors in [-1, 1], masks at latent
//! resolution (binarised and sampled as diffusers' `VaeImageProcessor` and `interpolate` do), the
//! feathered composite that puts unmasked pixels back after decoding, and the fill that gives
//! outpainting a plausible start.

use burn::tensor::{Device, Tensor, TensorData};
use image::{GrayImage, Luma, Rgb, RgbImage};

/// An 8-bit image as a `[1, 3, h, w]` tensor in [-1, 1].
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Tensor<4> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut planar = vec![0f32; 3 * w * h];
    for (x, y, pixel) in image.enumerate_pixels() {
        for c in 0..3 {
            planar[c * w * h + y as usize * w + x as usize] =
                f32::from(pixel[c]) / 255.0 * 2.0 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(planar, [1, 3, h, w]), device)
}

/// A decoded `[batch, 3, h, w]` tensor in [-1, 1] to values in [0, 1], as diffusers' postprocessing.
pub fn to_unit_range(decoded: Tensor<4>) -> Tensor<4> {
    decoded.div_scalar(2.0).add_scalar(0.5).clamp(0.0, 1.0)
}

/// The first image of a `[batch, 3, h, w]` tensor in [0, 1], rounded to 8 bits.
pub fn unit_tensor_to_image(unit: Tensor<4>) -> RgbImage {
    let [_, _, h, w] = unit.dims();
    let first = unit.narrow(0, 0, 1);
    let values: Vec<f32> = first
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data");
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let at = |c: usize| {
            let v = values[c * w * h + y as usize * w + x as usize];
            (v * 255.0).round().clamp(0.0, 255.0) as u8
        };
        Rgb([at(0), at(1), at(2)])
    })
}

/// A mask as diffusers' inpainting pipeline sees it: white (≥ 0.5) repaints, everything else keeps.
fn repaints(value: u8) -> bool {
    value >= 128
}

/// The mask at latent resolution, `[1, 1, h/f, w/f]` of 0 and 1: the top-left pixel of each f×f
/// block, as torch's nearest-neighbour `interpolate` picks it.
pub fn latent_mask(mask: &GrayImage, factor: u32, device: &Device) -> Tensor<4> {
    let (w, h) = (mask.width() / factor, mask.height() / factor);
    let values: Vec<f32> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| {
            f32::from(u8::from(repaints(
                mask.get_pixel(x * factor, y * factor)[0],
            )))
        })
        .collect();
    Tensor::from_data(
        TensorData::new(values, [1, 1, h as usize, w as usize]),
        device,
    )
}

/// The init image in [-1, 1] with the repainted region set to 0 (grey), as the 9-channel inpainting
/// models were trained to see it.
pub fn masked_tensor(image: &RgbImage, mask: &GrayImage, device: &Device) -> Tensor<4> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let keep: Vec<f32> = mask
        .pixels()
        .map(|p| f32::from(u8::from(!repaints(p[0]))))
        .collect();
    let keep = Tensor::<1>::from_floats(keep.as_slice(), device).reshape([1, 1, h, w]);
    image_to_tensor(image, device) * keep
}

/// The blend weight of the generated image at each pixel: the binarised mask blurred by a Gaussian
/// of `feather` pixels (0 keeps the edge hard).
pub fn feathered_alpha(mask: &GrayImage, feather: u32) -> Vec<f32> {
    let hard = GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        Luma([if repaints(mask.get_pixel(x, y)[0]) {
            255
        } else {
            0
        }])
    });
    let alpha = if feather == 0 {
        hard
    } else {
        image::imageops::blur(&hard, feather as f32 / 2.0)
    };
    alpha.pixels().map(|p| f32::from(p[0]) / 255.0).collect()
}

/// Puts the original back wherever the mask keeps it, blending across a feathered edge, so neither
/// a seam nor a colour shift shows outside the repainted region.
pub fn composite(
    original: &RgbImage,
    generated: &RgbImage,
    mask: &GrayImage,
    feather: u32,
) -> RgbImage {
    assert_eq!(
        original.dimensions(),
        generated.dimensions(),
        "composite of different sizes"
    );
    let alpha = feathered_alpha(mask, feather);
    let width = original.width();
    RgbImage::from_fn(width, original.height(), |x, y| {
        let a = alpha[(y * width + x) as usize];
        if a == 0.0 {
            return *original.get_pixel(x, y);
        }
        if a == 1.0 {
            return *generated.get_pixel(x, y);
        }
        let (o, g) = (original.get_pixel(x, y), generated.get_pixel(x, y));
        Rgb(std::array::from_fn(|c| {
            (f32::from(o[c]) * (1.0 - a) + f32::from(g[c]) * a).round() as u8
        }))
    })
}

/// The canvas and mask for outpainting: the image placed at (`left`, `top`) of a `width`×`height`
/// canvas, the new area filled with its nearest edge colours, blurred so the model sees soft colour
/// rather than streaks, and a mask covering the new area plus `overlap` pixels into the image so the
/// seam is repainted too.
pub fn outpaint_canvas(
    image: &RgbImage,
    (left, top): (u32, u32),
    (width, height): (u32, u32),
    overlap: u32,
) -> (RgbImage, GrayImage) {
    let (iw, ih) = image.dimensions();
    let inside = |x: u32, y: u32| x >= left && y >= top && x < left + iw && y < top + ih;
    let nearest = |x: u32, y: u32| {
        let sx = x.clamp(left, left + iw - 1) - left;
        let sy = y.clamp(top, top + ih - 1) - top;
        *image.get_pixel(sx, sy)
    };
    let stretched = RgbImage::from_fn(width, height, nearest);
    let radius = (width.max(height) as f32 / 16.0).max(4.0);
    let soft = image::imageops::blur(&stretched, radius);
    let canvas = RgbImage::from_fn(width, height, |x, y| {
        if inside(x, y) {
            nearest(x, y)
        } else {
            *soft.get_pixel(x, y)
        }
    });
    let mask = GrayImage::from_fn(width, height, |x, y| {
        let deep_inside = x >= left + overlap
            && y >= top + overlap
            && x + overlap < left + iw
            && y + overlap < top + ih;
        // Edges of the image that touch the canvas border are not seams.
        let keep = deep_inside
            || (inside(x, y)
                && (left == 0 || x >= left + overlap)
                && (top == 0 || y >= top + overlap)
                && (left + iw == width || x + overlap < left + iw)
                && (top + ih == height || y + overlap < top + ih));
        Luma([if keep { 0 } else { 255 }])
    });
    (canvas, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn half_mask(w: u32, h: u32) -> GrayImage {
        GrayImage::from_fn(w, h, |x, _| Luma([if x >= w / 2 { 255 } else { 0 }]))
    }

    #[test]
    fn hard_composite_keeps_every_unmasked_pixel_exactly() {
        let original = RgbImage::from_fn(32, 32, |x, y| Rgb([x as u8 * 7, y as u8 * 5, 200]));
        let generated = RgbImage::from_pixel(32, 32, Rgb([1, 2, 3]));
        let mask = half_mask(32, 32);
        let out = composite(&original, &generated, &mask, 0);
        for (x, y, p) in out.enumerate_pixels() {
            let expected = if x >= 16 {
                generated.get_pixel(x, y)
            } else {
                original.get_pixel(x, y)
            };
            assert_eq!(p, expected, "({x}, {y})");
        }
    }

    #[test]
    fn feather_widens_the_blend_band() {
        let mask = half_mask(64, 8);
        let band = |feather| {
            feathered_alpha(&mask, feather)
                .iter()
                .filter(|&&a| a > 0.0 && a < 1.0)
                .count()
        };
        assert_eq!(band(0), 0);
        let (narrow, wide) = (band(2), band(8));
        assert!(narrow > 0 && wide > narrow, "band {narrow} then {wide}");
    }

    #[test]
    fn latent_mask_samples_block_corners_and_binarises() {
        let mut mask = GrayImage::new(16, 16);
        mask.put_pixel(8, 0, Luma([200]));
        mask.put_pixel(1, 8, Luma([255]));
        mask.put_pixel(8, 8, Luma([100]));
        let values: Vec<f32> = latent_mask(&mask, 8, &Device::flex())
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(values, vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn outpaint_keeps_the_image_and_masks_the_new_area() {
        let image = RgbImage::from_pixel(16, 16, Rgb([10, 20, 30]));
        let (canvas, mask) = outpaint_canvas(&image, (8, 0), (24, 16), 2);
        assert_eq!(canvas.dimensions(), (24, 16));
        assert_eq!(canvas.get_pixel(12, 8), &Rgb([10, 20, 30]));
        assert_eq!(mask.get_pixel(0, 8)[0], 255, "new area repaints");
        assert_eq!(mask.get_pixel(9, 8)[0], 255, "the seam repaints");
        assert_eq!(
            mask.get_pixel(20, 8)[0],
            0,
            "the image beyond the seam is kept"
        );
        assert_eq!(mask.get_pixel(20, 0)[0], 0, "canvas borders are not seams");
    }
}
