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

use rayon::prelude::*;

use super::cpu_conv::{Geometry, Operands, Store};
use super::cpu_gemm::{Dst, Matrix, matmul, vectorized};
#[cfg(target_arch = "x86_64")]
use super::cpu_gemm::{fma_vectors, wide_vectors};
#[cfg(target_arch = "x86_64")]
use super::cpu_lanes::{Avx, Avx512};
use super::cpu_lanes::{Lanes, MAX_WIDTH, Portable};
use super::cpu_narrow;
use super::cpu_pool;

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
}

/// `values` as an array of its own length (known when compiling; a closure-free conversion).
#[inline(always)]
fn exactly<V: Copy, const N: usize>(values: &[V]) -> [V; N] {
    values.try_into().expect("as many values as the tile needs")
}

/// Bᵀ d for one line of a tile's `N` inputs: `N` is 4 for F(2×2, 3×3), 6 for F(4×4, 3×3).
#[inline(always)]
fn input_line<V: Lanes, const N: usize>(d: [V; N]) -> [V; N] {
    if N == 4 {
        let line = [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]];
        exactly(&line)
    } else {
        let (a, b) = (d[4] - d[2] * 4.0, d[3] - d[1] * 4.0);
        let (c, e) = (d[4] - d[2], (d[3] - d[1]) * 2.0);
        let line = [
            d[0] * 4.0 - d[2] * 5.0 + d[4],
            a + b,
            a - b,
            c + e,
            c - e,
            d[1] * 4.0 - d[3] * 5.0 + d[5],
        ];
        exactly(&line)
    }
}

/// Aᵀ m for one line of a tile's `N` products, giving its `M` outputs.
#[inline(always)]
fn output_line<V: Lanes, const N: usize, const M: usize>(m: [V; N]) -> [V; M] {
    if N == 4 {
        let line = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]];
        exactly(&line)
    } else {
        let (sum, diff) = (m[1] + m[2], m[1] - m[2]);
        let (far_sum, far_diff) = (m[3] + m[4], m[3] - m[4]);
        let line = [
            m[0] + sum + far_sum,
            diff + far_diff * 2.0,
            sum + far_sum * 4.0,
            diff + far_diff * 8.0 + m[5],
        ];
        exactly(&line)
    }
}

/// The algorithm that pays off for a 3×3 "same" convolution, if any. What decides is how many
/// tiles (columns) each position's product gets, over the whole batch, against the cost of
/// transforming the weights, which grows with the channels and not with the pixels. Measured on
/// two cores against im2col (Stable Diffusion's shapes, batch 2 unless said): F(4×4, 3×3) is
/// 2.2–2.9× faster from 64² up at 320 channels and more and at 32² at 640–1920, 1.2× at 32² with
/// 64. With fewer than 64 tiles of 4×4 (16² latents) F(2×2, 3×3) wins from 320 channels: its
/// transformed weights, written and read back for every convolution, are 16/36 the size, which
/// outweighs its 1.8× more multiplications there (AVX-512, batch 2, 640–2560 → 640–1280 channels:
/// 0.84–0.97× F(4×4, 3×3)'s time, which is 0.7–0.8× im2col's; at batch 1, 1.1–1.35× faster than
/// im2col). At 8² im2col is as fast or faster than either. With few
/// output channels (a decoder's 3 colours, a UNet's 4 latent channels) the product is small and
/// im2col's copies, nine of the input, cost the most: F(4×4, 3×3) transforms 2.25 and is 2–4×
/// faster from 32 input channels and 64 tiles (64 → 3 at 512²: 100 → 45 ms; 128 → 3: 150–250 →
/// 65 ms). From 3 or 4 input channels im2col is faster.
///
/// On a CPU whose widest vectors are AVX2's, F(4×4, 3×3) wins at 16² too: there its few tiles
/// have each block of output channels' weights transformed just before their products
/// ([`FUSED_TILES`]), so they never go to memory (AVX2 Zen 3, two cores, batch 2, alternating,
/// best of 8: 1280, 1920 and 2560 → 1280 channels 44.7, 67.2 and 90.7 ms against F(2×2, 3×3)'s
/// 45.1, 67.8 and 101.1 ms), and F(2×2, 3×3) wins at 8² (1280 and 2560 → 1280 channels: 0.88×
/// im2col's time at best, 0.81–0.82× in the median, before its weights too were transformed a block
/// at a time).
pub fn choose(g: &Geometry) -> Option<Tile> {
    choose_for(g, Width::widest())
}

/// [`choose`] on a CPU whose widest vectors are `width`.
pub fn choose_for(g: &Geometry, width: Width) -> Option<Tile> {
    let [h, w] = g.output_size();
    let channels = g.channels_in.min(g.channels_out);
    let tiles = |m: usize| g.batch * h.div_ceil(m) * w.div_ceil(m);
    if g.kernel != 3 || g.padding != 1 || g.stride != 1 {
        None
    } else if tiles(4) < FUSED_TILES && tiles(2) >= 64 && channels >= 320 && width != Width::Avx {
        Some(Tile::F2)
    } else if (tiles(4) >= 32 && channels >= 128)
        || (tiles(4) >= 64 && channels >= 64)
        || (tiles(4) >= 64 && g.channels_in >= 32 && g.channels_out < 64)
    {
        Some(Tile::F4)
    } else if channels >= 320 && tiles(2) >= if width == Width::Avx { 32 } else { 64 } {
        Some(Tile::F2)
    } else {
        None
    }
}

/// G g Gᵀ for every (output, input) channel pair into `u`, laid out [c_out][position][c_in] so that
/// each position's matrix is a strided [c_out × c_in] view.
fn transform_weights(
    tile: Tile,
    width: Width,
    weight: &[f32],
    c_out: usize,
    c_in: usize,
    u: &mut [f32],
) {
    let positions = tile.positions();
    assert_eq!(weight.len(), c_out * c_in * 9, "3×3 weights");
    assert_eq!(
        u.len(),
        c_out * positions * c_in,
        "transformed weights' size"
    );
    u.par_chunks_mut(positions * c_in)
        .zip(weight.par_chunks_exact(c_in * 9))
        .for_each(|(u, weight)| {
            let transform = WeightTiles {
                weight,
                u,
                stream: true,
                next: &[],
            };
            transform_weight(tile, width, transform)
        });
}

/// G g for one line of `N` kernels' taps (a kernel column, or a row of G g): `N` values, 4 for
/// F(2×2, 3×3), 6 for F(4×4, 3×3).
#[inline(always)]
fn kernel_line<V: Lanes, const N: usize>([a, b, c]: [V; 3]) -> [V; N] {
    if N == 4 {
        let line = [a, (a + b + c) * 0.5, (a - b + c) * 0.5, c];
        exactly(&line)
    } else {
        // Multiplications by 1/6 rather than divisions, which take several times as long.
        const SIXTH: f32 = 1.0 / 6.0;
        let (even, odd) = (a + c, b);
        let (far_even, far_odd) = ((a * 0.25 + c) * SIXTH, b * (0.5 * SIXTH));
        let line = [
            a * 0.25,
            (even + odd) * -SIXTH,
            (even - odd) * -SIXTH,
            far_even + far_odd,
            far_even - far_odd,
            c,
        ];
        exactly(&line)
    }
}

/// Floats in a cache line.
const CACHE_LINE_FLOATS: usize = 16;

/// Asks for the cache line holding `values[0]` to be brought into the cache.
#[inline(always)]
fn prefetch(values: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: SSE, which every x86-64 CPU has; a prefetch reads nothing the program sees.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = values;
}

/// G g Gᵀ for one output channel's kernels (`weight`: [c_in][9]) into `u` ([position][c_in]),
/// every element of which it writes, [`Lanes::WIDTH`] input channels at a time: their taps
/// turned into registers ([`Lanes::taps`]), G down each kernel column and then along each row
/// of the result. With `stream`, the result goes past the caches ([`Lanes::stream`]): it is read
/// back only after the whole layer's weights (up to 236 MB) are written, and streaming also saves
/// reading each line in before writing it (AVX2 Zen 3, two cores, batch 2, alternating, best of
/// 30: 0.97, 0.92 and 0.92× the time of a 64² 320-channel, 32² 640-channel and 16² 1280-channel
/// convolution).
///
/// `next` is the kernels transformed after these (the next output channel's, as long), which are
/// asked for in the cache as the same channels of these are read. Where a block of output channels
/// is transformed a slice of its input channels at a time ([`FUSED_FLOATS`]), each channel's
/// kernels are a few kilobytes, too short a run for the hardware's prefetch to get ahead of the
/// reads, which had stalled the transform on memory. With that and the loop's registers and rows
/// kept free of bounds arithmetic ([`WeightTiles::whole`]), AVX2 Zen 3, two cores, batch 2,
/// alternating, best of 20: 16² convolutions of 1280 and 2560 → 1280 channels 36.0 → 31.5 ms and
/// 72 → 62 ms, 8² ones 16.0 → 14.4 ms and 31.4 → 27.7 ms.
struct WeightTiles<'a> {
    weight: &'a [f32],
    u: &'a mut [f32],
    stream: bool,
    next: &'a [f32],
}

impl WeightTiles<'_> {
    /// Input channels `0..whole` (a multiple of `R` registers), `R` registers of them at a time
    /// with no partial register: the transform's loop as the compiler can keep it in registers,
    /// with each position's row of `u` reached by stepping from the last.
    ///
    /// # Safety
    /// The CPU has the instructions of `V`.
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn whole<V: Lanes, const N: usize, const R: usize>(&mut self, whole: usize) {
        let c_in = self.weight.len() / 9;
        let (width, step) = (V::WIDTH, R * V::WIDTH);
        // SAFETY: the caller's.
        let zero = unsafe { V::splat(0.0) };
        for start in (0..whole).step_by(step) {
            let taps = start * 9..(start + step) * 9;
            if let Some(next) = self.next.get(taps.clone()) {
                for line in next.chunks(CACHE_LINE_FLOATS) {
                    prefetch(line);
                }
            }
            // G g for each register's channels: column `col` of the kernels through G.
            let mut columns = [[[zero; N]; 3]; R];
            for (kernels, columns) in self.weight[taps].chunks_exact(9 * width).zip(&mut columns) {
                // SAFETY: the caller's.
                let g = unsafe { V::taps(kernels) };
                for (col, column) in columns.iter_mut().enumerate() {
                    *column = kernel_line([g[col], g[3 + col], g[6 + col]]);
                }
            }
            let mut positions = self.u.chunks_exact_mut(c_in);
            for row in 0..N {
                // Row `row` of G g through G: positions (row, 0..N).
                let mut lines = [[zero; N]; R];
                for (line, c) in lines.iter_mut().zip(&columns) {
                    *line = kernel_line([c[0][row], c[1][row], c[2][row]]);
                }
                for col in 0..N {
                    let Some(position) = positions.next() else {
                        unreachable!("N² positions");
                    };
                    let out = &mut position[start..][..step];
                    for (line, out) in lines.iter().zip(out.chunks_exact_mut(width)) {
                        if self.stream {
                            line[col].stream(out);
                        } else {
                            line[col].store(out);
                        }
                    }
                }
            }
        }
    }
}

impl Transform for WeightTiles<'_> {
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn run<V: Lanes, const M: usize, const N: usize>(mut self) {
        let c_in = self.weight.len() / 9;
        assert_eq!(self.u.len(), N * N * c_in, "transformed weights' size");
        let width = V::WIDTH;
        // Registers per cache line: each line of `u` is written whole before the next, which
        // streamed stores need to leave the core as one write (64-byte lines written in 32-byte
        // halves, 36 stores apart, took 2.7× as long).
        let per_line = if self.stream {
            (CACHE_LINE_FLOATS / width).max(1)
        } else {
            1
        };
        let whole = c_in - c_in % (per_line * width);
        // SAFETY (both): the caller's.
        match per_line {
            1 => unsafe { self.whole::<V, N, 1>(whole) },
            2 => unsafe { self.whole::<V, N, 2>(whole) },
            _ => unreachable!("vectors of at least 8 floats"),
        }
        let Self {
            weight,
            u,
            stream,
            next: _,
        } = self;
        // SAFETY: the caller's.
        let zero = unsafe { V::splat(0.0) };
        // The last channels, in registers of fewer lanes.
        for start in (whole..c_in).step_by(per_line * width) {
            // G g for each register's channels: column `col` of the kernels through G.
            let mut columns = [[[zero; N]; 3]; 2];
            let mut lanes = [0; 2];
            for (r, columns) in columns[..per_line].iter_mut().enumerate() {
                let first = (start + r * width).min(c_in);
                lanes[r] = width.min(c_in - first);
                let mut padded = [0f32; 9 * MAX_WIDTH];
                padded[..lanes[r] * 9].copy_from_slice(&weight[first * 9..][..lanes[r] * 9]);
                // SAFETY: the caller's.
                let g = unsafe { V::taps(&padded) };
                for (col, column) in columns.iter_mut().enumerate() {
                    *column = kernel_line([g[col], g[3 + col], g[6 + col]]);
                }
            }
            for row in 0..N {
                // Row `row` of G g through G: positions (row, 0..N).
                let mut lines = [[zero; N]; 2];
                for (line, c) in lines.iter_mut().zip(&columns[..per_line]) {
                    *line = kernel_line([c[0][row], c[1][row], c[2][row]]);
                }
                for col in 0..N {
                    let out = &mut u[(row * N + col) * c_in + start..];
                    for (r, line) in lines[..per_line].iter().enumerate() {
                        if lanes[r] == 0 {
                            break;
                        }
                        line[col].store_first(&mut out[r * width..], lanes[r]);
                    }
                }
            }
        }
        if stream {
            V::fence();
        }
    }
}

vectorized! {
    /// [`WeightTiles`] with the widest [`Lanes`] type the CPU and `width` allow.
    fn transform_weight(tile: Tile, width: Width, transform: WeightTiles<'_>) {
        dispatch::<_, FMA, WIDE>(transform, tile, width)
    }
}

/// `phases[p · len + t] = padded[M · t + p]`, where `padded` is `row` with one zero in front and
/// zeros after it, as far as the `M` phases of `len` (more than `row.len() / M`) reach. The row is
/// read where it lies: copying it behind the zero first cost a copy and a stalled reload.
#[inline(always)]
fn deinterleave<const M: usize>(row: &[f32], phases: &mut [f32], len: usize) {
    let whole = row.len() / M;
    assert!(whole < len, "room for the padding");
    let mut phases = phases[..M * len].chunks_exact_mut(len);
    let mut phases: [&mut [f32]; M] = std::array::from_fn(|_| phases.next().expect("M phases"));
    for phase in &mut phases {
        phase[whole..].fill(0.0);
    }
    phases[0][0] = 0.0;
    let (first, rest) = phases.split_at_mut(1);
    let first = &mut first[0][1..=whole];
    // The values of tile t's first column but one, … last column, and the next tile's first.
    for (t, values) in row.chunks_exact(M).enumerate() {
        for (phase, &x) in rest.iter_mut().zip(values) {
            phase[t] = x;
        }
        first[t] = values[M - 1];
    }
    for (phase, &x) in rest.iter_mut().zip(&row[M * whole..]) {
        phase[whole] = x;
    }
}

/// Which [`Lanes`] type the transforms may use at most: the widest the CPU has, unless a test
/// asks for a narrower one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Width {
    Portable,
    Avx,
    Avx512,
}

impl Width {
    /// The widest type this CPU runs.
    pub fn widest() -> Self {
        #[cfg(target_arch = "x86_64")]
        if wide_vectors() {
            return Self::Avx512;
        } else if fma_vectors() {
            return Self::Avx;
        }
        Self::Portable
    }
}

/// A transform written once for any [`Lanes`] type and tile (`M` outputs and `N` inputs a side).
trait Transform {
    /// # Safety
    /// The CPU has the instructions of `V`.
    #[allow(unsafe_code)]
    unsafe fn run<V: Lanes, const M: usize, const N: usize>(self);
}

/// `transform` for `tile` with the widest [`Lanes`] type that both the [`vectorized`] build it is
/// inlined into (`FMA`, `WIDE`) and `width` allow.
#[inline(always)]
fn dispatch<T: Transform, const FMA: bool, const WIDE: bool>(
    transform: T,
    tile: Tile,
    width: Width,
) {
    #[allow(unsafe_code)]
    // SAFETY: `WIDE` is true only in the build `vectorized` runs on CPUs with AVX-512F, and `FMA`
    // only there and in the one for CPUs with AVX2 (and so AVX). `Portable` needs nothing.
    unsafe {
        match (tile, width) {
            #[cfg(target_arch = "x86_64")]
            (Tile::F2, Width::Avx512) if WIDE => transform.run::<Avx512, 2, 4>(),
            #[cfg(target_arch = "x86_64")]
            (Tile::F4, Width::Avx512) if WIDE => transform.run::<Avx512, 4, 6>(),
            #[cfg(target_arch = "x86_64")]
            (Tile::F2, Width::Avx | Width::Avx512) if FMA => transform.run::<Avx, 2, 4>(),
            #[cfg(target_arch = "x86_64")]
            (Tile::F4, Width::Avx | Width::Avx512) if FMA => transform.run::<Avx, 4, 6>(),
            (Tile::F2, _) => transform.run::<Portable, 2, 4>(),
            (Tile::F4, _) => transform.run::<Portable, 4, 6>(),
        }
    }
}

/// Bᵀ d B for one channel's tiles in tile rows `top..top + rows` of one image, laid out
/// [position][tile] in `v` with `stride` between positions, [`Lanes::WIDTH`] tiles at a time.
/// `plane` is the channel's input before any upsampling.
struct InputTiles<'a> {
    v: &'a mut [f32],
    stride: usize,
    plane: &'a [f32],
    g: &'a Geometry,
    top: usize,
    rows: usize,
}

impl Transform for InputTiles<'_> {
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn run<V: Lanes, const M: usize, const N: usize>(self) {
        let Self {
            v,
            stride,
            plane,
            g,
            top,
            rows,
        } = self;
        let lanes_max = V::WIDTH;
        // SAFETY: the caller's.
        let zero = unsafe { V::splat(0.0) };
        let s = g.scale();
        let (in_h, in_w) = (g.height * s, g.width * s);
        let [_, out_w] = g.output_size();
        let tiles_w = out_w.div_ceil(M);
        let groups = tiles_w.div_ceil(lanes_max);
        // Each of the `N` input rows with one zero column of padding on the left and enough on the
        // right for the last group's unused lanes, split into its `M` phases: phase p holds padded
        // columns p, M + p, 2M + p, … So column j of neighbouring tiles is consecutive values of
        // phase j (or, past the tile's first `M` columns, of phase j − M one tile further on):
        // vector loads instead of a gather.
        let phase_len = lanes_max * groups + 1;
        let width = M * phase_len;
        // An upsampled input row.
        let mut row = vec![0f32; if s == 1 { 0 } else { in_w }];
        let mut band = vec![0f32; N * width];
        for tr in 0..rows {
            for (r, phases) in band.chunks_exact_mut(width).enumerate() {
                // Input row of this band row: M·(tile row) − 1 + r, in the (upsampled) input.
                let y = M * (top + tr) + r;
                if y == 0 || y > in_h {
                    phases.fill(0.0);
                    continue;
                }
                let src = &plane[(y - 1) / s * g.width..][..g.width];
                if s == 1 {
                    deinterleave::<M>(src, phases, phase_len);
                } else {
                    for (pair, &x) in row.chunks_exact_mut(2).zip(src) {
                        pair.fill(x);
                    }
                    deinterleave::<M>(&row, phases, phase_len);
                }
            }
            for group in 0..groups {
                let first = group * lanes_max;
                let lanes = lanes_max.min(tiles_w - first);
                // d[j][r]: input (r, j) of each tile in the group. (Loops, not closures: a
                // closure is compiled without the build's instructions, so its vector
                // arithmetic would be calls.)
                let mut d = [[zero; N]; N];
                for (j, column) in d.iter_mut().enumerate() {
                    let (phase, from) = if j < M {
                        (j, first)
                    } else {
                        (j - M, first + 1)
                    };
                    let values = &band[phase * phase_len + from..];
                    for (r, x) in column.iter_mut().enumerate() {
                        // SAFETY: the caller's.
                        *x = unsafe { V::load(&values[r * width..]) };
                    }
                }
                // Bᵀ d a column at a time: d[j][i] becomes its element (i, j).
                for column in &mut d {
                    *column = input_line(*column);
                }
                let t = tr * tiles_w + first;
                for i in 0..N {
                    // Row i of Bᵀ d through Bᵀ again: row i of Bᵀ d B.
                    let mut row = [zero; N];
                    for (x, column) in row.iter_mut().zip(&d) {
                        *x = column[i];
                    }
                    let line = input_line(row);
                    for (j, x) in line.into_iter().enumerate() {
                        let dst = &mut v[(i * N + j) * stride + t..];
                        if lanes == lanes_max {
                            x.store(dst);
                        } else {
                            x.store_first(dst, lanes);
                        }
                    }
                }
            }
        }
    }
}

vectorized! {
    /// [`InputTiles`] with the widest [`Lanes`] type the CPU and `width` allow.
    fn transform_input(tile: Tile, width: Width, transform: InputTiles<'_>) {
        dispatch::<_, FMA, WIDE>(transform, tile, width)
    }
}

/// Aᵀ m A for one output channel's tiles in one image (laid out [position][tile] in `products`
/// with `stride` between positions), plus `base`, stored into its output rows `M·top..` as `store`
/// says, [`Lanes::WIDTH`] tiles at a time.
struct OutputTiles<'a> {
    out: &'a mut [f32],
    store: Store,
    base: f32,
    products: &'a [f32],
    stride: usize,
    g: &'a Geometry,
    top: usize,
    rows: usize,
}

impl Transform for OutputTiles<'_> {
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn run<V: Lanes, const M: usize, const N: usize>(self) {
        let Self {
            out,
            store,
            base,
            products,
            stride,
            g,
            top,
            rows,
        } = self;
        let lanes_max = V::WIDTH;
        // SAFETY: the caller's.
        let zero = unsafe { V::splat(0.0) };
        let [out_h, out_w] = g.output_size();
        let tiles_w = out_w.div_ceil(M);
        for tr in 0..rows {
            for group in 0..tiles_w.div_ceil(lanes_max) {
                let first = group * lanes_max;
                let lanes = lanes_max.min(tiles_w - first);
                let t = tr * tiles_w + first;
                // p[j][i]: the products at position (i, j) of each tile in the group.
                let mut p = [[zero; N]; N];
                for (j, column) in p.iter_mut().enumerate() {
                    for (i, x) in column.iter_mut().enumerate() {
                        let values = &products[(i * N + j) * stride + t..];
                        // SAFETY: the caller's.
                        *x = unsafe {
                            if lanes == lanes_max {
                                V::load(values)
                            } else {
                                V::load_first(values, lanes)
                            }
                        };
                    }
                }
                // Aᵀ p a column at a time: ap[j][i] is its element (i, j).
                let mut ap = [[zero; M]; N];
                for (ap, p) in ap.iter_mut().zip(&p) {
                    *ap = output_line(*p);
                }
                let x0 = M * first;
                let len = (out_w - x0).min(M * lanes_max);
                for dy in 0..M {
                    let y = M * (top + tr) + dy;
                    if y >= out_h {
                        break;
                    }
                    // Row dy of Aᵀ p through Aᵀ again, each tile's outputs side by side.
                    let mut column = [zero; N];
                    for (x, ap) in column.iter_mut().zip(&ap) {
                        *x = ap[dy];
                    }
                    let row: [V; M] = output_line(column);
                    let mut line = [[0f32; MAX_WIDTH]; M];
                    V::interleave(row, line.as_flattened_mut());
                    let dst = &mut out[y * out_w + x0..][..len];
                    for (d, &x) in dst.iter_mut().zip(line.as_flattened()) {
                        *d = store.apply(*d, base + x);
                    }
                }
            }
        }
    }
}

vectorized! {
    /// [`OutputTiles`] with the widest [`Lanes`] type the CPU and `width` allow.
    fn transform_output(tile: Tile, width: Width, transform: OutputTiles<'_>) {
        dispatch::<_, FMA, WIDE>(transform, tile, width)
    }
}

/// Multiply-adds ×2 under which a position's product runs on one thread, the positions' products
/// side by side, rather than each spread over the pool: TAESD's 64-channel products (about 3
/// MFLOP) took longer to share out between two threads and wait for than to compute.
const SHARED_PRODUCT_FLOPS: usize = 16 << 20;

/// Products per thread from which larger products, too, run one per thread: the threads then wait
/// for each other once per band of tiles, at the end, rather than at the end of every product,
/// and no product's split leaves a thread idle while the other finishes its share (or is
/// preempted). With two threads (16 or 36 positions), alternating in one process: a 512² UNet
/// step took 0.93–0.95× the time at best and 0.88–0.96× in the median, the VAE's 512² decode 0.80×
/// and 0.75×. With many threads a product each would leave some idle in the last round, so each
/// product is shared out over the pool there.
const PRODUCTS_PER_THREAD: usize = 4;

/// Tiles in each product at least (all of them when there are fewer): the product re-reads the
/// transformed weights, up to 36 × 2560 × 1280 floats, for every band of tiles.
pub const MIN_TILES: usize = 256;

/// Tiles in a product below which each block of output channels' weights is transformed just
/// before its products ([`FUSED_CHANNELS`]) rather than the whole layer's first. With few tiles
/// the products are narrow and the weight transform, written out and read back through memory, is
/// as much work as they are: AVX2 Zen 3, two cores, batch 2 (32 tiles), alternating, best of 7:
/// 8² convolutions of 1280 and 2560 → 1280 channels by F(2×2, 3×3) took 0.92× and 0.78× the time,
/// 16² ones by F(4×4, 3×3) 0.93–1.0×. From 128 tiles (16² by F(2×2, 3×3), 32² and 64²) the
/// blocks took 1.1–1.25× as long: each block's products are narrower than the whole layer's.
pub const FUSED_TILES: usize = 64;

/// Output channels per block where [`FUSED_TILES`] says so: 64, 20 blocks for 1280 channels, an
/// even share for two threads.
const FUSED_CHANNELS: usize = 64;

/// Floats of a block's transformed weights made at a time (1.7 MiB): a slice of its input
/// channels (192 by F(4×4, 3×3), 432 by F(2×2, 3×3)), whose products add onto the last slice's.
/// The whole block's, up to 36 × 2560 floats per channel, went out to memory and were read back
/// from it. AVX2 Zen 3, two cores, batch 2, alternating, best of 7 in three runs: 16²
/// convolutions of 1280 and 2560 → 1280 channels by F(4×4, 3×3) took 0.80–0.84× the time of
/// 96-channel blocks transformed whole, 8² ones by F(2×2, 3×3) 0.88–1.0× (16.5 → 15.9 ms and
/// 35.4 → 31.4 ms); blocks of 48 and 96 channels with the same slices were within 3% of 64.
/// With the products of [`cpu_narrow`], slices of 96 and 48 channels were within 3% of 192.
const FUSED_FLOATS: usize = 64 * 36 * 192;

/// `output = relu?(conv(input) + bias (+ output))` by `tile` for a geometry [`choose`] accepts;
/// `band_floats` bounds each of the two transformed buffers unless that would leave fewer than
/// `min_tiles` tiles per product. The images of a batch share each band, so their tiles share its
/// products. The transforms use the widest [`Lanes`] type the CPU has, up to `width`.
#[allow(clippy::too_many_arguments)]
pub fn convolve(
    tile: Tile,
    width: Width,
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
    let tiles_w = out_w.div_ceil(m);
    let tile_rows = out_h.div_ceil(m);
    let row_tiles = g.batch * tiles_w;
    let band = (band_floats / (positions * c_in.max(c_out) * row_tiles))
        .max(min_tiles.div_ceil(row_tiles))
        .clamp(1, tile_rows);
    // Each block's weights are transformed once only where one band holds every tile.
    let fused = band == tile_rows && row_tiles * tile_rows < FUSED_TILES;
    let mut u = cpu_pool::floats(if fused { 0 } else { c_out * positions * c_in });
    if !fused {
        transform_weights(tile, width, operands.weight, c_out, c_in, &mut u);
    }
    // Input channels whose products are made at a time where weights are transformed a block of
    // output channels at a time: a slice ([`FUSED_FLOATS`]).
    let slice = if fused {
        (FUSED_FLOATS / (FUSED_CHANNELS * positions))
            .next_multiple_of(CACHE_LINE_FLOATS)
            .min(c_in)
    } else {
        1
    };
    // Both written in full for each band before they are read.
    let mut v = cpu_pool::floats(positions * c_in * band * row_tiles);
    let mut p = cpu_pool::floats(positions * c_out * band * row_tiles);
    for top in (0..tile_rows).step_by(band) {
        let rows = band.min(tile_rows - top);
        // Tiles of one image in this band, and of the whole batch.
        let tiles = rows * tiles_w;
        let total = g.batch * tiles;
        let v = &mut v[..positions * c_in * total];
        let p = &mut p[..positions * c_out * total];
        // Laid out [slice][position][channel][tile]: each slice of input channels' tiles for one
        // position together, which the products of a slice read; a channel at a time (laid out
        // [channel][position][tile]) where every product reads all channels.
        v.par_chunks_mut(slice * positions * total)
            .enumerate()
            .for_each(|(s, v)| {
                let channels = v.len() / (positions * total);
                for c in 0..channels {
                    for image in 0..g.batch {
                        let channel = s * slice + c;
                        let plane = &operands.input[(image * c_in + channel) * plane_in..];
                        let transform = InputTiles {
                            v: &mut v[c * total + image * tiles..],
                            stride: channels * total,
                            plane: &plane[..plane_in],
                            g,
                            top,
                            rows,
                        };
                        transform_input(tile, width, transform);
                    }
                }
            });
        // Position `position`'s transformed tiles of input channels `first..first + count`, all
        // in one slice unless slices are single channels.
        let inputs = |position: usize, first: usize, count: usize| {
            let channels = slice.min(c_in - first);
            let start = (first * positions + position * channels) * total;
            let row_stride = if slice == 1 { positions } else { 1 } * total;
            Matrix::new(&v[start..], count, total, row_stride)
        };
        // Where channel c's products for position q start, and the step between positions.
        let one_per_thread = 2 * c_in * c_out * total < SHARED_PRODUCT_FLOPS
            || positions >= PRODUCTS_PER_THREAD * rayon::current_num_threads();
        let (channel_step, position_step) = if fused {
            // Laid out [c_out][position][tile]: a block of output channels per thread, and a
            // slice of its input channels at a time, whose transformed weights
            // ([channel][position][input]) are in the cache for their products.
            let narrow = width == Width::Avx && cpu_narrow::available();
            p.par_chunks_mut(FUSED_CHANNELS * positions * total)
                .zip(operands.weight.par_chunks(FUSED_CHANNELS * c_in * 9))
                .for_each(|(p, weight)| {
                    let channels = weight.len() / (c_in * 9);
                    let mut u = cpu_pool::floats(channels * positions * slice);
                    for first in (0..c_in).step_by(slice) {
                        let slice = slice.min(c_in - first);
                        let u = &mut u[..channels * positions * slice];
                        let per_channel = u.chunks_exact_mut(positions * slice);
                        // Output channel o's kernels of this slice; none past the block.
                        let segment = |o: usize| {
                            if o < channels {
                                &weight[(o * c_in + first) * 9..][..slice * 9]
                            } else {
                                &[][..]
                            }
                        };
                        for (o, u) in per_channel.enumerate() {
                            let transform = WeightTiles {
                                weight: segment(o),
                                u,
                                stream: false,
                                next: segment(o + 1),
                            };
                            transform_weight(tile, width, transform);
                        }
                        let mode = if first == 0 {
                            Dst::Overwrite
                        } else {
                            Dst::Accumulate
                        };
                        for position in 0..positions {
                            let lhs = Matrix::new(
                                &u[position * slice..],
                                channels,
                                slice,
                                positions * slice,
                            );
                            let rhs = inputs(position, first, slice);
                            let p = &mut p[position * total..];
                            if narrow {
                                cpu_narrow::product(p, positions * total, mode, lhs, rhs);
                            } else {
                                matmul(p, positions * total, mode, lhs, rhs, 1.0, false);
                            }
                        }
                    }
                });
            (positions * total, total)
        } else if one_per_thread {
            let weights =
                |position: usize| Matrix::new(&u[position * c_in..], c_out, c_in, positions * c_in);
            // Laid out [position][c_out][tile]: one product per thread, the positions side by side.
            p.par_chunks_mut(c_out * total)
                .enumerate()
                .for_each(|(position, p)| {
                    let (lhs, rhs) = (weights(position), inputs(position, 0, c_in));
                    matmul(p, total, Dst::Overwrite, lhs, rhs, 1.0, false)
                });
            (total, c_out * total)
        } else {
            // Laid out [c_out][position][tile]: each product shared out over the pool.
            for position in 0..positions {
                let lhs = Matrix::new(&u[position * c_in..], c_out, c_in, positions * c_in);
                let p = &mut p[position * total..];
                matmul(
                    p,
                    positions * total,
                    Dst::Overwrite,
                    lhs,
                    inputs(position, 0, c_in),
                    1.0,
                    true,
                );
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
                let transform = OutputTiles {
                    out,
                    store,
                    base,
                    products,
                    stride: position_step,
                    g,
                    top,
                    rows,
                };
                transform_output(tile, width, transform)
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(batch: usize, side: usize, channels_in: usize, channels_out: usize) -> Geometry {
        Geometry {
            batch,
            channels_in,
            height: side,
            width: side,
            channels_out,
            kernel: 3,
            padding: 1,
            stride: 1,
            upsample: false,
        }
    }

    #[test]
    fn small_maps_tiles_depend_on_the_vectors() {
        let sd = |c_in, c_out| geometry(2, 16, c_in, c_out);
        for width in [Width::Portable, Width::Avx512] {
            assert_eq!(
                choose_for(&sd(1280, 1280), width),
                Some(Tile::F2),
                "{width:?}"
            );
        }
        for c_in in [640, 1280, 1920, 2560] {
            assert_eq!(choose_for(&sd(c_in, 1280), Width::Avx), Some(Tile::F4));
        }
        // At 8², F(2×2, 3×3) with AVX2 and im2col otherwise, and im2col for a single image.
        assert_eq!(
            choose_for(&geometry(2, 8, 2560, 1280), Width::Avx),
            Some(Tile::F2)
        );
        assert_eq!(choose_for(&geometry(1, 8, 2560, 1280), Width::Avx), None);
        for width in [Width::Portable, Width::Avx512] {
            assert_eq!(
                choose_for(&geometry(2, 8, 1280, 1280), width),
                None,
                "{width:?}"
            );
        }
        // From 64², F(4×4, 3×3) on any CPU.
        for width in [Width::Portable, Width::Avx, Width::Avx512] {
            assert_eq!(
                choose_for(&geometry(2, 64, 320, 320), width),
                Some(Tile::F4)
            );
        }
    }
}
