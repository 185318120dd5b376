//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(2×2, 3×3): each 2×2 block of output
//! pixels comes from a 4×4 block of input through 16 element-wise products instead of 36 multiply-
//! adds, so the matrix products (one per position in the 4×4 block, summing over input channels)
//! do 2.25× less arithmetic than im2col's. The transforms only add, subtract and halve, so the
//! results stay within a few ulps of direct convolution.
//!
//! Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015), with
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],
//! Aᵀ = [1 1 1 0; 0 1 −1 −1]: output = Aᵀ [Σ_c (G g Gᵀ) ⊙ (Bᵀ d B)] A.

use rayon::prelude::*;

use super::cpu_conv::Geometry;
use super::cpu_gemm::{Dst, Matrix, matmul};

/// Positions in a transformed 4×4 block.
const POSITIONS: usize = 16;

/// Whether F(2×2, 3×3) pays off: a 3×3 "same" convolution with enough pixels and channels that the
/// per-position products run near full rate. Measured on two cores against im2col: 1.35× faster at
/// 128 channels, 1.6× at 256, 1.9× at 512, but slower at 64 channels (the products' depth is the
/// channel count, and the transforms cost as much as they save), and no faster at 16² (too few
/// tiles per product).
pub fn applies(g: &Geometry) -> bool {
    let [h, w] = g.output_size();
    g.kernel == 3
        && g.padding == 1
        && h >= 32
        && w >= 32
        && g.channels_in >= 128
        && g.channels_out >= 128
}

/// G g Gᵀ for every (output, input) channel pair, laid out [c_out][position][c_in] so that each
/// position's matrix is a strided [c_out × c_in] view.
fn transform_weights(weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let mut u = vec![0f32; c_out * POSITIONS * c_in];
    u.par_chunks_mut(POSITIONS * c_in)
        .zip(weight.par_chunks_exact(c_in * 9))
        .for_each(|(u, w)| {
            for (ci, g) in w.chunks_exact(9).enumerate() {
                // G g: 4 rows of 3.
                let mut gg = [[0f32; 3]; 4];
                for col in 0..3 {
                    let (a, b, c) = (g[col], g[3 + col], g[6 + col]);
                    gg[0][col] = a;
                    gg[1][col] = 0.5 * (a + b + c);
                    gg[2][col] = 0.5 * (a - b + c);
                    gg[3][col] = c;
                }
                // (G g) Gᵀ: 4 columns from each row.
                for (row, r) in gg.iter().enumerate() {
                    let (a, b, c) = (r[0], r[1], r[2]);
                    let out = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                    for (col, v) in out.into_iter().enumerate() {
                        u[(row * 4 + col) * c_in + ci] = v;
                    }
                }
            }
        });
    u
}

/// Bᵀ d B for one channel's tiles in tile rows `top..top + rows`, laid out [position][tile].
/// `plane` is the channel's input before any upsampling.
fn transform_input(v: &mut [f32], plane: &[f32], g: &Geometry, top: usize, rows: usize) {
    let s = g.scale();
    let (in_h, in_w) = (g.height * s, g.width * s);
    let [_, out_w] = g.output_size();
    let tiles_w = out_w.div_ceil(2);
    let tiles = rows * tiles_w;
    // Four input rows, one zero column of padding on the left and enough on the right.
    let width = 2 * tiles_w + 2;
    let mut band = vec![0f32; 4 * width];
    for tr in 0..rows {
        for (r, row) in band.chunks_exact_mut(width).enumerate() {
            // Input row of this band row: 2·(tile row) − 1 + r, in the (upsampled) input.
            let y = 2 * (top + tr) + r;
            row.fill(0.0);
            if y == 0 || y > in_h {
                continue;
            }
            let src = &plane[(y - 1) / s * g.width..][..g.width];
            let dst = &mut row[1..1 + in_w];
            if s == 1 {
                dst.copy_from_slice(src);
            } else {
                for (pair, &x) in dst.chunks_exact_mut(2).zip(src) {
                    pair.fill(x);
                }
            }
        }
        let (r0, rest) = band.split_at(width);
        let (r1, rest) = rest.split_at(width);
        let (r2, r3) = rest.split_at(width);
        for tx in 0..tiles_w {
            let c = 2 * tx;
            let t = tr * tiles_w + tx;
            // Bᵀ d: four rows of four.
            let mut bd = [[0f32; 4]; 4];
            for j in 0..4 {
                let (d0, d1, d2, d3) = (r0[c + j], r1[c + j], r2[c + j], r3[c + j]);
                bd[0][j] = d0 - d2;
                bd[1][j] = d1 + d2;
                bd[2][j] = d2 - d1;
                bd[3][j] = d1 - d3;
            }
            // (Bᵀ d) B.
            for (i, r) in bd.iter().enumerate() {
                let out = [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]];
                for (j, x) in out.into_iter().enumerate() {
                    v[(i * 4 + j) * tiles + t] = x;
                }
            }
        }
    }
}

/// Aᵀ m A for one output channel's tiles, added onto its output rows `2·top..`.
fn transform_output(out: &mut [f32], m: &[f32], g: &Geometry, top: usize, rows: usize) {
    let [out_h, out_w] = g.output_size();
    let tiles_w = out_w.div_ceil(2);
    let tiles = rows * tiles_w;
    for tr in 0..rows {
        for tx in 0..tiles_w {
            let t = tr * tiles_w + tx;
            let at = |i: usize, j: usize| m[(i * 4 + j) * tiles + t];
            // Aᵀ m: two rows of four.
            let am: [[f32; 4]; 2] = [
                std::array::from_fn(|j| at(0, j) + at(1, j) + at(2, j)),
                std::array::from_fn(|j| at(1, j) - at(2, j) - at(3, j)),
            ];
            for (dy, r) in am.iter().enumerate() {
                let y = 2 * (top + tr) + dy;
                if y >= out_h {
                    continue;
                }
                let row = &mut out[y * out_w..][..out_w];
                let x = 2 * tx;
                row[x] += r[0] + r[1] + r[2];
                if x + 1 < out_w {
                    row[x + 1] += r[1] - r[2] - r[3];
                }
            }
        }
    }
}

/// `output (+)= conv(input)` for a geometry [`applies`] accepts; `band_floats` bounds each of the
/// two transformed buffers.
pub fn convolve(
    output: &mut [f32],
    mode: Dst,
    input: &[f32],
    weight: &[f32],
    g: &Geometry,
    band_floats: usize,
) {
    let [out_h, out_w] = g.output_size();
    let (c_in, c_out) = (g.channels_in, g.channels_out);
    let plane_in = g.height * g.width;
    let plane_out = out_h * out_w;
    if mode == Dst::Overwrite {
        output.fill(0.0);
    }
    let u = transform_weights(weight, c_out, c_in);
    let tiles_w = out_w.div_ceil(2);
    let tile_rows = out_h.div_ceil(2);
    let band = (band_floats / (POSITIONS * c_in.max(c_out) * tiles_w)).clamp(1, tile_rows);
    let mut v = vec![0f32; POSITIONS * c_in * band * tiles_w];
    let mut m = vec![0f32; POSITIONS * c_out * band * tiles_w];
    for (image, out) in input
        .chunks_exact(c_in * plane_in)
        .zip(output.chunks_exact_mut(c_out * plane_out))
    {
        for top in (0..tile_rows).step_by(band) {
            let rows = band.min(tile_rows - top);
            let tiles = rows * tiles_w;
            let v = &mut v[..POSITIONS * c_in * tiles];
            let m = &mut m[..POSITIONS * c_out * tiles];
            v.par_chunks_mut(POSITIONS * tiles)
                .zip(image.par_chunks_exact(plane_in))
                .for_each(|(v, plane)| transform_input(v, plane, g, top, rows));
            for p in 0..POSITIONS {
                matmul(
                    &mut m[p * tiles..],
                    POSITIONS * tiles,
                    Dst::Overwrite,
                    Matrix::new(&u[p * c_in..], c_out, c_in, POSITIONS * c_in),
                    Matrix::new(&v[p * tiles..], c_in, tiles, POSITIONS * tiles),
                    1.0,
                    true,
                );
            }
            out.par_chunks_mut(plane_out)
                .zip(m.par_chunks(POSITIONS * tiles))
                .for_each(|(out, m)| transform_output(out, m, g, top, rows));
        }
    }
}
