//! Products with a few dozen columns, read from where their operands lie: a Winograd
//! convolution's products on small maps, where each is a block of output channels' transformed
//! weights (a row per channel) against a slice of input channels' transformed tiles (a row of
//! tiles per channel), 32 tiles wide for a CFG batch at 16² or 8². The `gemm` crate copies the
//! tiles into its own layout for every such product (a tenth of a 16² convolution's time); here
//! the tiles are read in place, 16 at a time along a row, and each weight is broadcast to them.
//! The tiles of each slice and position lie together ([`cpu_winograd::convolve`]), so the rows a
//! product reads are one run of memory rather than rows a few kilobytes apart that fall into the
//! same few sets of the L1 cache.
//!
//! AVX2 Zen 3, two cores, batch 2, alternating, best of 20 in two to three runs, against `gemm`
//! on the earlier layout: 8² convolutions of 1280 and 2560 → 1280 channels 13.2–13.3 → 12.6–12.9
//! ms and 26.4 → 24.5–25.0 ms, 16² ones of 1280 → 1280 channels 30.1–30.3 → 28.9–29.4 ms; a 512²
//! UNet step 0.97× the time in the median (6.62 against 6.80 s, nine steps each).
//!
//! [`cpu_winograd::convolve`]: super::cpu_winograd::convolve

use super::cpu_gemm::{Dst, Matrix};

/// Whether [`product`] runs on this CPU: with AVX2 and fused multiply-adds.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::cpu_gemm::fma_vectors();
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Output channels per register block: six rows of two 8-wide registers, twelve sums, which with
/// the two tile registers and a broadcast fill AVX2's sixteen.
const ROWS: usize = 6;

/// `dst[r · dst_row_stride + c] (+)= (weights · tiles)[r, c]`, as [`matmul`] with a scale of 1,
/// on this CPU, which must have what [`available`] asks for (it panics otherwise). Neither
/// operand may be [`Matrix::transpose_of`] another.
///
/// [`matmul`]: super::cpu_gemm::matmul
pub fn product(dst: &mut [f32], dst_row_stride: usize, mode: Dst, weights: Matrix, tiles: Matrix) {
    let (channels, columns, depth) = (weights.rows, tiles.cols, weights.cols);
    assert_eq!(tiles.rows, depth, "inner dimensions differ");
    if channels == 0 || columns == 0 || depth == 0 {
        return;
    }
    assert!(available(), "AVX2 and FMA");
    assert!(
        !weights.transposed && !tiles.transposed,
        "row-major operands"
    );
    assert!(dst_row_stride >= columns, "destination rows overlap");
    assert!(
        dst.len() >= (channels - 1) * dst_row_stride + columns
            && weights.data.len() >= (channels - 1) * weights.row_stride + depth
            && tiles.data.len() >= (depth - 1) * tiles.row_stride + columns,
        "narrow product bounds"
    );
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: the CPU has AVX2 and FMA (asserted); the asserts above keep every row the blocks
    // read or write inside its slice, and `dst`, borrowed mutably, overlaps neither operand.
    unsafe {
        x86::product(x86::Raw {
            out: dst.as_mut_ptr(),
            out_stride: dst_row_stride,
            weights: weights.data.as_ptr(),
            weights_stride: weights.row_stride,
            tiles: tiles.data.as_ptr(),
            tiles_stride: tiles.row_stride,
            channels,
            columns,
            depth,
            accumulate: mode == Dst::Accumulate,
        })
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::ROWS;
    use crate::models::cpu_lanes::first_lanes;

    /// # Safety
    /// The CPU has AVX2 and FMA; the pointers reach every row the sizes and strides say, and the
    /// destination overlaps neither operand.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn product(n: Raw) {
        let mut o = 0;
        while o < n.channels {
            let rows = ROWS.min(n.channels - o);
            let mut t = 0;
            while t < n.columns {
                let lanes = 16.min(n.columns - t);
                // SAFETY (each): the caller's; block (o, t) lies inside the product.
                unsafe {
                    let whole = lanes % 8 == 0;
                    match (rows, lanes > 8, whole) {
                        (6, true, true) => block::<6, 2, false>(n, o, t, lanes),
                        (6, false, true) => block::<6, 1, false>(n, o, t, lanes),
                        (5, true, true) => block::<5, 2, false>(n, o, t, lanes),
                        (5, false, true) => block::<5, 1, false>(n, o, t, lanes),
                        (4, true, true) => block::<4, 2, false>(n, o, t, lanes),
                        (4, false, true) => block::<4, 1, false>(n, o, t, lanes),
                        (3, true, true) => block::<3, 2, false>(n, o, t, lanes),
                        (3, false, true) => block::<3, 1, false>(n, o, t, lanes),
                        (2, true, true) => block::<2, 2, false>(n, o, t, lanes),
                        (2, false, true) => block::<2, 1, false>(n, o, t, lanes),
                        (_, true, true) => block::<1, 2, false>(n, o, t, lanes),
                        (_, false, true) => block::<1, 1, false>(n, o, t, lanes),
                        // Columns that end in a partial register (few tiles): a row at a time.
                        (_, true, false) => {
                            (o..o + rows).for_each(|o| block::<1, 2, true>(n, o, t, lanes))
                        }
                        (_, false, false) => {
                            (o..o + rows).for_each(|o| block::<1, 1, true>(n, o, t, lanes))
                        }
                    }
                }
                t += lanes;
            }
            o += rows;
        }
    }

    /// A product's destination and operands as pointers to their first elements.
    #[derive(Clone, Copy)]
    pub struct Raw {
        pub out: *mut f32,
        pub out_stride: usize,
        pub weights: *const f32,
        pub weights_stride: usize,
        pub tiles: *const f32,
        pub tiles_stride: usize,
        pub channels: usize,
        pub columns: usize,
        pub depth: usize,
        pub accumulate: bool,
    }

    /// Rows `o..o + R` and columns `t..t + lanes` (at most 8·`V`, more than 8·(`V` − 1)) of the
    /// product: `R`·`V` sums in registers over the whole depth.
    ///
    /// # Safety
    /// As for [`product`], and the block lies inside the product.
    #[inline(always)]
    unsafe fn block<const R: usize, const V: usize, const MASKED: bool>(
        n: Raw,
        o: usize,
        t: usize,
        lanes: usize,
    ) {
        // SAFETY: the caller's. Loads and stores of a whole register stay below column
        // `t + lanes`; the last register of a partial block is masked to its lanes.
        unsafe {
            let last = first_lanes(lanes - 8 * (V - 1));
            let weights = n.weights.add(o * n.weights_stride);
            let mut tiles = n.tiles.add(t);
            let mut sums = [[_mm256_setzero_ps(); V]; R];
            for k in 0..n.depth {
                let mut x = [_mm256_setzero_ps(); V];
                for (v, x) in x.iter_mut().enumerate() {
                    *x = if !MASKED || v + 1 < V {
                        _mm256_loadu_ps(tiles.add(8 * v))
                    } else {
                        _mm256_maskload_ps(tiles.add(8 * v), last)
                    };
                }
                for (r, sums) in sums.iter_mut().enumerate() {
                    let w = _mm256_broadcast_ss(&*weights.add(r * n.weights_stride + k));
                    for (sum, &x) in sums.iter_mut().zip(&x) {
                        *sum = _mm256_fmadd_ps(w, x, *sum);
                    }
                }
                tiles = tiles.add(n.tiles_stride);
            }
            for (r, sums) in sums.iter().enumerate() {
                let row = n.out.add((o + r) * n.out_stride + t);
                for (v, &sum) in sums.iter().enumerate() {
                    let at = row.add(8 * v);
                    if !MASKED || v + 1 < V {
                        let sum = if n.accumulate {
                            _mm256_add_ps(_mm256_loadu_ps(at), sum)
                        } else {
                            sum
                        };
                        _mm256_storeu_ps(at, sum);
                    } else {
                        let sum = if n.accumulate {
                            _mm256_add_ps(_mm256_maskload_ps(at, last), sum)
                        } else {
                            sum
                        };
                        _mm256_maskstore_ps(at, last, sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every block shape, whole and partial (one and two registers, a partial last one), against
    /// sums in f64, written over and added to a destination whose padding between rows stays
    /// untouched.
    #[test]
    fn narrow_products_match_sums() {
        if !available() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 1009) as f32 - 504.0) / 504.0;
        // Up to 13 channels: every remainder of rows after whole blocks of six. Columns of one
        // and two whole registers, of a partial one alone and after whole ones.
        let small = (1..=13).flat_map(|channels| {
            [3, 8, 13, 16, 21, 24].map(|columns| (channels, columns, 1 + channels % 5))
        });
        for (channels, columns, depth) in [(64, 32, 192)].into_iter().chain(small) {
            let (weights_stride, tiles_stride, out_stride) = (depth + 5, columns + 3, columns + 2);
            let weights: Vec<f32> = (0..channels * weights_stride).map(value).collect();
            let tiles: Vec<f32> = (0..depth * tiles_stride).map(|i| value(i + 11)).collect();
            for accumulate in [false, true] {
                let mut out = vec![2f32; channels * out_stride];
                let mode = if accumulate {
                    Dst::Accumulate
                } else {
                    Dst::Overwrite
                };
                product(
                    &mut out,
                    out_stride,
                    mode,
                    Matrix::new(&weights, channels, depth, weights_stride),
                    Matrix::new(&tiles, depth, columns, tiles_stride),
                );
                for o in 0..channels {
                    for t in 0..out_stride {
                        let sum: f64 = (0..depth)
                            .map(|k| {
                                f64::from(weights[o * weights_stride + k])
                                    * f64::from(tiles[k * tiles_stride + t])
                            })
                            .sum();
                        let want = match (t < columns, accumulate) {
                            (false, _) => 2.0,
                            (true, false) => sum,
                            (true, true) => 2.0 + sum,
                        };
                        let got = f64::from(out[o * out_stride + t]);
                        assert!(
                            (got - want).abs() < 1e-4,
                            "({o}, {t}) of {channels}×{columns}×{depth}, accumulate \
                             {accumulate}: {got} ≠ {want}"
                        );
                    }
                }
            }
        }
    }
}
