//! 3×3 stride-1 convolutions by Winograd's minimal filtering F(m×m, 3×3): each m×m block of output
//! pixels comes from an (m+2)×(m+2) block of input through (m+2)² element-wise products instead of
//! 9m² multiply-adds, so the matrix products (one per position in the block, summing over input
//! channels) do 2.25× (m = 2) or 4× (m = 4) less arithmetic than im2col's. F(2×2, 3×3)'s transforms
//! only add, subtract and halve, so its results stay within a few ulps of direct convolution;
//! F(4×4, 3×3)'s scale by up to 8 and by sixths, which costs about one more decimal digit.
//!
//! Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (2015): output =
//! Aᵀ [Σ_c (G g Gᵀ) ⊙ (Bᵀ d B)] A, with for F(2×2, 3×3)
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1],
//! Aᵀ = [1 1 1 0; 0 1 −1 −1], and for F(4×4, 3×3) (interpolation points 0, ±1, ±2)
//! Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1],
//! G = [¼ 0 0; −⅙ −⅙ −⅙; −⅙ ⅙ −⅙; 1⁄24 1⁄12 ⅙; 1⁄24 −1⁄12 ⅙; 0 0 1],
//! Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0; 0 1 −1 8 −8 1].

use std::ops::{Add, Mul, Sub};

use rayon::prelude::*;

use super::cpu_conv::{Geometry, Operands, Store};
use super::cpu_gemm::{Dst, Matrix, matmul, vectorized};

/// Which minimal filtering algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): 2×2 outputs from 4×4 inputs.
    F2,
    /// F(4×4, 3×3): 4×4 outputs from 6×6 inputs.
    F4,
}

impl Tile {
    /// Output pixels along each side of a tile.
    pub fn output(self) -> usize {
        match self {
            Self::F2 => 2,
            Self::F4 => 4,
        }
    }

    /// Input pixels along each side of a tile, and values along each side of a transformed one.
    fn size(self) -> usize {
        self.output() + 2
    }

    /// Positions in a transformed tile.
    fn positions(self) -> usize {
        self.size() * self.size()
    }

    /// G g for one line of the kernel (the first `size` values are used).
    fn kernel_line(self, [a, b, c]: [f32; 3]) -> [f32; 6] {
        match self {
            Self::F2 => [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c, 0.0, 0.0],
            Self::F4 => {
                let (even, odd) = (a + c, b);
                let (far_even, far_odd) = (a / 24.0 + c / 6.0, b / 12.0);
                [
                    a / 4.0,
                    -(even + odd) / 6.0,
                    -(even - odd) / 6.0,
                    far_even + far_odd,
                    far_even - far_odd,
                    c,
                ]
            }
        }
    }

    /// Bᵀ d for one line of `size` inputs.
    #[inline(always)]
    fn input_line(self, d: [Lanes; 6]) -> [Lanes; 6] {
        match self {
            Self::F2 => [
                d[0] - d[2],
                d[1] + d[2],
                d[2] - d[1],
                d[1] - d[3],
                Lanes::ZERO,
                Lanes::ZERO,
            ],
            Self::F4 => {
                let (a, b) = (d[4] - d[2] * 4.0, d[3] - d[1] * 4.0);
                let (c, e) = (d[4] - d[2], (d[3] - d[1]) * 2.0);
                [
                    d[0] * 4.0 - d[2] * 5.0 + d[4],
                    a + b,
                    a - b,
                    c + e,
                    c - e,
                    d[1] * 4.0 - d[3] * 5.0 + d[5],
                ]
            }
        }
    }

    /// Aᵀ m for one line of `size` products (the first `output` values are used).
    #[inline(always)]
    fn output_line(self, m: [Lanes; 6]) -> [Lanes; 4] {
        match self {
            Self::F2 => [
                m[0] + m[1] + m[2],
                m[1] - m[2] - m[3],
                Lanes::ZERO,
                Lanes::ZERO,
            ],
            Self::F4 => {
                let (sum, diff) = (m[1] + m[2], m[1] - m[2]);
                let (far_sum, far_diff) = (m[3] + m[4], m[3] - m[4]);
                [
                    m[0] + sum + far_sum,
                    diff + far_diff * 2.0,
                    sum + far_sum * 4.0,
                    diff + far_diff * 8.0 + m[5],
                ]
            }
        }
    }
}

/// Tiles transformed side by side, one per lane.
const LANES: usize = 8;

/// The same position in [`LANES`] neighbouring tiles: arithmetic on these is element-wise, so
/// the compiler turns each operation into one vector instruction.
#[derive(Clone, Copy)]
struct Lanes([f32; LANES]);

impl Lanes {
    const ZERO: Self = Self([0.0; LANES]);
}

impl Add for Lanes {
    type Output = Self;
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] + other.0[l]))
    }
}

impl Sub for Lanes {
    type Output = Self;
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] - other.0[l]))
    }
}

impl Mul<f32> for Lanes {
    type Output = Self;
    #[inline(always)]
    fn mul(self, k: f32) -> Self {
        Self(self.0.map(|x| x * k))
    }
}

/// The algorithm that pays off for a 3×3 "same" convolution, if any. What decides is how many
/// tiles (columns) each position's product gets, over the whole batch, against the cost of
/// transforming the weights, which grows with the channels and not with the pixels. Measured on
/// two cores against im2col (Stable Diffusion's shapes, batch 2 unless said): F(4×4, 3×3) is
/// 2.2–2.9× faster from 64² up at 320 channels and more and at 32² at 640–1920, 1.9× at 16² with
/// 1280–2560 channels, 1.2× at 32² with 64; with 16 tiles or fewer (16² at batch 1) F(2×2, 3×3)
/// wins, 1.1–1.35× from 320 channels; at 8² im2col is as fast or faster than either.
pub fn choose(g: &Geometry) -> Option<Tile> {
    let [h, w] = g.output_size();
    let channels = g.channels_in.min(g.channels_out);
    let tiles = |m: usize| g.batch * h.div_ceil(m) * w.div_ceil(m);
    if g.kernel != 3 || g.padding != 1 {
        None
    } else if (tiles(4) >= 32 && channels >= 128) || (tiles(4) >= 64 && channels >= 64) {
        Some(Tile::F4)
    } else if tiles(2) >= 64 && channels >= 320 {
        Some(Tile::F2)
    } else {
        None
    }
}

/// G g Gᵀ for every (output, input) channel pair, laid out [c_out][position][c_in] so that each
/// position's matrix is a strided [c_out × c_in] view. The transform is linear in the nine taps, so
/// it is one small product per output channel, `[position × tap] · [tap × c_in]`, whose matrix is
/// the transform of each unit kernel.
fn transform_weights(tile: Tile, weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    let (n, positions) = (tile.size(), tile.positions());
    let mut transform = vec![0f32; positions * 9];
    for tap in 0..9 {
        let unit: [f32; 9] = std::array::from_fn(|k| if k == tap { 1.0 } else { 0.0 });
        // G g: a column of `n` for each kernel column.
        let columns: [[f32; 6]; 3] =
            std::array::from_fn(|col| tile.kernel_line([unit[col], unit[3 + col], unit[6 + col]]));
        // (G g) Gᵀ: each row of G g through G again.
        for row in 0..n {
            let line = tile.kernel_line([columns[0][row], columns[1][row], columns[2][row]]);
            for (col, &v) in line[..n].iter().enumerate() {
                transform[(row * n + col) * 9 + tap] = v;
            }
        }
    }
    // Not zeroed first: up to 36 × 2560 × 1280 floats, every one written by its product.
    let len = c_out * positions * c_in;
    assert_eq!(weight.len(), c_out * c_in * 9, "3×3 weights");
    let mut u = Vec::with_capacity(len);
    u.spare_capacity_mut()[..len]
        .par_chunks_mut(positions * c_in)
        .zip(weight.par_chunks_exact(c_in * 9))
        .for_each(|(u, w)| {
            matmul(
                u,
                c_in,
                Dst::Overwrite,
                Matrix::new(&transform, positions, 9, 9),
                Matrix::transpose_of(w, 9, c_in, 9),
                1.0,
                false,
            )
        });
    #[allow(unsafe_code)]
    // SAFETY: the chunks cover all `len` elements (c_out of them, `positions × c_in` each), and
    // each product overwrites all of its chunk: `positions` rows of `c_in`, `c_in` apart.
    unsafe {
        u.set_len(len)
    };
    u
}

/// `phases[p · len + t] = row[M · t + p]` for the `len = row.len() / M` whole tiles of `row`.
#[inline(always)]
fn deinterleave<const M: usize>(row: &[f32], phases: &mut [f32]) {
    let len = row.len() / M;
    let phases = &mut phases[..M * len];
    for (t, values) in row.chunks_exact(M).enumerate() {
        for (p, &x) in values.iter().enumerate() {
            phases[p * len + t] = x;
        }
    }
}

vectorized! {
    /// Bᵀ d B for one channel's tiles in tile rows `top..top + rows` of one image, laid out
    /// [position][tile] with `stride` between positions, [`LANES`] tiles at a time. `plane` is the
    /// channel's input before any upsampling.
    fn transform_input(
        tile: Tile,
        v: &mut [f32],
        stride: usize,
        plane: &[f32],
        g: &Geometry,
        top: usize,
        rows: usize,
    ) {
        let (m, n) = (tile.output(), tile.size());
        let s = g.scale();
        let (in_h, in_w) = (g.height * s, g.width * s);
        let [_, out_w] = g.output_size();
        let tiles_w = out_w.div_ceil(m);
        let groups = tiles_w.div_ceil(LANES);
        // Each of the `n` input rows with one zero column of padding on the left and enough on
        // the right for the last group's unused lanes, split into its `m` phases: phase p holds
        // columns p, m + p, 2m + p, … So column j of [`LANES`] neighbouring tiles is [`LANES`]
        // consecutive values of phase j (or, past the tile's first `m` columns, of phase j − m one
        // tile further on): vector loads instead of a gather.
        let phase_len = LANES * groups + 1;
        let width = m * phase_len;
        let mut row = vec![0f32; width];
        let mut band = vec![0f32; n * width];
        for tr in 0..rows {
            for (r, phases) in band.chunks_exact_mut(width).enumerate() {
                // Input row of this band row: m·(tile row) − 1 + r, in the (upsampled) input.
                let y = m * (top + tr) + r;
                if y == 0 || y > in_h {
                    phases.fill(0.0);
                    continue;
                }
                // Only the padding is zeroed; the input overwrites the rest.
                row[0] = 0.0;
                row[1 + in_w..].fill(0.0);
                let src = &plane[(y - 1) / s * g.width..][..g.width];
                let dst = &mut row[1..1 + in_w];
                if s == 1 {
                    dst.copy_from_slice(src);
                } else {
                    for (pair, &x) in dst.chunks_exact_mut(2).zip(src) {
                        pair.fill(x);
                    }
                }
                match tile {
                    Tile::F2 => deinterleave::<2>(&row, phases),
                    Tile::F4 => deinterleave::<4>(&row, phases),
                }
            }
            for group in 0..groups {
                let first = group * LANES;
                let lanes = LANES.min(tiles_w - first);
                // dt[j][r]: input (r, j) of each tile in the group.
                let mut dt = [[Lanes::ZERO; 6]; 6];
                for (r, phases) in band.chunks_exact(width).enumerate() {
                    for (j, column) in dt[..n].iter_mut().enumerate() {
                        let (phase, from) = if j < m { (j, first) } else { (j - m, first + 1) };
                        let values = &phases[phase * phase_len + from..][..LANES];
                        column[r] = Lanes(values.try_into().expect("LANES values"));
                    }
                }
                // Bᵀ d: column j of the tiles through Bᵀ.
                let mut bd = [[Lanes::ZERO; 6]; 6];
                for (j, column) in dt[..n].iter().enumerate() {
                    for (i, x) in tile.input_line(*column)[..n].iter().enumerate() {
                        bd[i][j] = *x;
                    }
                }
                // (Bᵀ d) B: each row through Bᵀ again.
                let t = tr * tiles_w + first;
                for (i, row) in bd[..n].iter().enumerate() {
                    for (j, x) in tile.input_line(*row)[..n].iter().enumerate() {
                        let dst = &mut v[(i * n + j) * stride + t..][..lanes];
                        match <&mut [f32; LANES]>::try_from(&mut *dst) {
                            Ok(whole) => *whole = x.0,
                            Err(_) => dst.copy_from_slice(&x.0[..lanes]),
                        }
                    }
                }
            }
        }
    }
}

vectorized! {
    /// Aᵀ m A for one output channel's tiles in one image (laid out [position][tile] with
    /// `stride` between positions), plus `base`, stored into its output rows `m·top..` as `store`
    /// says, [`LANES`] tiles at a time.
    #[allow(clippy::too_many_arguments)]
    fn transform_output(
        tile: Tile,
        out: &mut [f32],
        store: Store,
        base: f32,
        products: &[f32],
        stride: usize,
        g: &Geometry,
        top: usize,
        rows: usize,
    ) {
        let (m, n) = (tile.output(), tile.size());
        let [out_h, out_w] = g.output_size();
        let tiles_w = out_w.div_ceil(m);
        for tr in 0..rows {
            for group in 0..tiles_w.div_ceil(LANES) {
                let first = group * LANES;
                let lanes = LANES.min(tiles_w - first);
                let t = tr * tiles_w + first;
                // pt[j][i]: the products at position (i, j) of each tile in the group.
                let mut pt = [[Lanes::ZERO; 6]; 6];
                for i in 0..n {
                    for (j, column) in pt[..n].iter_mut().enumerate() {
                        let p = &products[(i * n + j) * stride + t..][..lanes];
                        // A whole group as one fixed-size (vector) copy, not a call to memcpy.
                        match <[f32; LANES]>::try_from(p) {
                            Ok(whole) => column[i] = Lanes(whole),
                            Err(_) => column[i].0[..lanes].copy_from_slice(p),
                        }
                    }
                }
                // Aᵀ p: column j of the products through Aᵀ.
                let mut ap = [[Lanes::ZERO; 6]; 4];
                for (j, column) in pt[..n].iter().enumerate() {
                    for (i, x) in tile.output_line(*column)[..m].iter().enumerate() {
                        ap[i][j] = *x;
                    }
                }
                // (Aᵀ p) A: each row through Aᵀ again.
                for (dy, row) in ap[..m].iter().enumerate() {
                    let y = m * (top + tr) + dy;
                    if y >= out_h {
                        continue;
                    }
                    let row = tile.output_line(*row);
                    let dst = &mut out[y * out_w..][..out_w];
                    for l in 0..lanes {
                        let x0 = m * (first + l);
                        for (dx, d) in dst[x0..out_w.min(x0 + m)].iter_mut().enumerate() {
                            *d = store.apply(*d, base + row[dx].0[l]);
                        }
                    }
                }
            }
        }
    }
}

/// Multiply-adds ×2 under which a position's product runs on one thread, the positions' products
/// side by side, rather than each spread over the pool: TAESD's 64-channel products (about 3
/// MFLOP) took longer to share out between two threads and wait for than to compute.
const SHARED_PRODUCT_FLOPS: usize = 16 << 20;

/// Tiles in each product at least (all of them when there are fewer): the product re-reads the
/// transformed weights, up to 36 × 2560 × 1280 floats, for every band of tiles.
pub const MIN_TILES: usize = 256;

/// `output = relu?(conv(input) + bias (+ output))` by `tile` for a geometry [`choose`] accepts;
/// `band_floats` bounds each of the two transformed buffers unless that would leave fewer than
/// `min_tiles` tiles per product. The images of a batch share each band, so their tiles share its
/// products.
pub fn convolve(
    tile: Tile,
    output: &mut [f32],
    store: Store,
    operands: Operands,
    g: &Geometry,
    band_floats: usize,
    min_tiles: usize,
) {
    let [out_h, out_w] = g.output_size();
    let (c_in, c_out) = (g.channels_in, g.channels_out);
    let (m, positions) = (tile.output(), tile.positions());
    let plane_in = g.height * g.width;
    let plane_out = out_h * out_w;
    let u = transform_weights(tile, operands.weight, c_out, c_in);
    let tiles_w = out_w.div_ceil(m);
    let tile_rows = out_h.div_ceil(m);
    let row_tiles = g.batch * tiles_w;
    let band = (band_floats / (positions * c_in.max(c_out) * row_tiles))
        .max(min_tiles.div_ceil(row_tiles))
        .clamp(1, tile_rows);
    let mut v = vec![0f32; positions * c_in * band * row_tiles];
    let mut p = vec![0f32; positions * c_out * band * row_tiles];
    for top in (0..tile_rows).step_by(band) {
        let rows = band.min(tile_rows - top);
        // Tiles of one image in this band, and of the whole batch.
        let tiles = rows * tiles_w;
        let total = g.batch * tiles;
        let v = &mut v[..positions * c_in * total];
        let p = &mut p[..positions * c_out * total];
        v.par_chunks_mut(positions * total)
            .enumerate()
            .for_each(|(c, v)| {
                for image in 0..g.batch {
                    let plane = &operands.input[(image * c_in + c) * plane_in..][..plane_in];
                    transform_input(tile, &mut v[image * tiles..], total, plane, g, top, rows);
                }
            });
        let weights =
            |position: usize| Matrix::new(&u[position * c_in..], c_out, c_in, positions * c_in);
        let inputs =
            |position: usize| Matrix::new(&v[position * total..], c_in, total, positions * total);
        // Where channel c's products for position q start, and the step between positions.
        let (channel_step, position_step) = if 2 * c_in * c_out * total < SHARED_PRODUCT_FLOPS {
            // Laid out [position][c_out][tile]: one product per thread, the positions side by side.
            p.par_chunks_mut(c_out * total)
                .enumerate()
                .for_each(|(position, p)| {
                    let (lhs, rhs) = (weights(position), inputs(position));
                    matmul(p, total, Dst::Overwrite, lhs, rhs, 1.0, false)
                });
            (total, c_out * total)
        } else {
            // Laid out [c_out][position][tile]: each product shared out over the pool.
            for position in 0..positions {
                let (lhs, rhs) = (weights(position), inputs(position));
                let p = &mut p[position * total..];
                matmul(p, positions * total, Dst::Overwrite, lhs, rhs, 1.0, true);
            }
            (positions * total, total)
        };
        let p = &*p;
        output
            .par_chunks_mut(plane_out)
            .enumerate()
            .for_each(|(i, out)| {
                let (image, c) = (i / c_out, i % c_out);
                let base = operands.bias.map_or(0.0, |b| b[c]);
                let products = &p[c * channel_step + image * tiles..];
                transform_output(
                    tile,
                    out,
                    store,
                    base,
                    products,
                    position_step,
                    g,
                    top,
                    rows,
                )
            });
    }
}
