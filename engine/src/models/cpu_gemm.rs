//! What the CPU kernels share: one safe entry to the `gemm` crate (the matrix product Burn's CPU
//! backend itself uses), with strided row-major views bounds-checked before the call, and a way to
//! run element-wise loops with 16- or 8-wide vectors where the CPU has them.

/// Defines `fn name(args) { body }` so that the body is compiled three times: for AVX-512 (16-wide
/// vectors, 32 registers) and for AVX2 and FMA, each of which runs when the CPU has it, and for
/// baseline x86-64, whose 4-wide vectors halve the speed of exp-heavy loops. The body sees a
/// `const FMA: bool`, true in the first two builds, to hand to [`mul_add`] and the functions built
/// on it, and a `const WIDE: bool`, true in the AVX-512 build, for code written with its
/// intrinsics.
macro_rules! vectorized {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body<const FMA: bool, const WIDE: bool>($($arg: $ty),*) $body

            #[cfg(target_arch = "x86_64")]
            if $crate::models::cpu_gemm::wide_vectors() {
                vectorized!(@run "avx512f,avx2,fma", body::<true, true>, $($arg: $ty),*);
                return;
            }
            #[cfg(target_arch = "x86_64")]
            if $crate::models::cpu_gemm::fma_vectors() {
                vectorized!(@run "avx2,fma", body::<true, false>, $($arg: $ty),*);
                return;
            }
            body::<false, false>($($arg),*)
        }
    };
    // `build`, compiled for `$features`, called once the caller has checked the CPU has them.
    (@run $features:literal, $build:expr, $($arg:ident: $ty:ty),*) => {{
        #[target_feature(enable = $features)]
        fn build($($arg: $ty),*) {
            $build($($arg),*)
        }
        #[allow(unsafe_code)]
        // SAFETY: the CPU has just been checked for the features `build` is compiled for.
        unsafe {
            build($($arg),*)
        };
    }};
}
pub(crate) use vectorized;

/// Whether [`vectorized`] runs its AVX-512 build on this CPU (16-wide vectors, 32 registers), for
/// kernels that block their work to the register file.
#[cfg(target_arch = "x86_64")]
pub(crate) fn wide_vectors() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether [`vectorized`] runs at least its AVX2 build on this CPU (8-wide vectors, fused
/// multiply-adds).
#[cfg(target_arch = "x86_64")]
pub(crate) fn fma_vectors() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Whether [`vectorized`] runs an AVX-512 build: never off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn wide_vectors() -> bool {
    false
}

/// `a · b + c`, as one fused instruction in [`vectorized`]'s AVX-512 and AVX2 builds (`FMA`), and
/// as a product and a sum in its baseline build, where a fused multiply-add would be a library call
/// that stops the loop being vectorised.
#[inline(always)]
pub(crate) fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

use std::mem::MaybeUninit;

use rayon::prelude::*;

/// A matrix inside a slice: element (r, c) is `data[r · row_stride + c]`.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    /// Read as its transpose: element (r, c) is `data[c · row_stride + r]`.
    pub transposed: bool,
}

impl<'a> Matrix<'a> {
    pub fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            transposed: false,
        }
    }

    /// The `rows × cols` transpose of a row-major `cols × rows` matrix.
    pub fn transpose_of(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            transposed: true,
        }
    }

    fn strides(&self) -> (isize, isize) {
        let (rs, cs) = if self.transposed {
            (1, self.row_stride)
        } else {
            (self.row_stride, 1)
        };
        (rs as isize, cs as isize)
    }

    fn last_index(&self) -> usize {
        let (rs, cs) = self.strides();
        (self.rows - 1) * rs as usize + (self.cols - 1) * cs as usize
    }
}

/// What the product does with the destination's old contents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dst {
    Overwrite,
    Accumulate,
}

/// What a product writes into: `f32`s, or memory not yet written, which it may only overwrite
/// (gemm then stores into it without loading it first).
///
/// # Safety
/// The type must have `f32`'s layout.
#[allow(unsafe_code)]
pub unsafe trait Destination {
    const INITIALISED: bool;
}

// SAFETY: it is `f32`.
#[allow(unsafe_code)]
unsafe impl Destination for f32 {
    const INITIALISED: bool = true;
}

// SAFETY: `MaybeUninit<f32>` has `f32`'s layout.
#[allow(unsafe_code)]
unsafe impl Destination for MaybeUninit<f32> {
    const INITIALISED: bool = false;
}

/// `scale · (lhs · rhs)` in a new row-major buffer, which the product writes without it being
/// zeroed first.
pub fn product(lhs: Matrix, rhs: Matrix, scale: f32, parallel: bool) -> Vec<f32> {
    let mut out = Vec::new();
    product_into(&mut out, lhs, rhs, scale, parallel);
    out
}

/// [`product`] into `out`'s memory, which is replaced and grown if need be: a buffer reused for
/// products of several sizes is neither zeroed nor reallocated each time.
pub fn product_into(out: &mut Vec<f32>, lhs: Matrix, rhs: Matrix, scale: f32, parallel: bool) {
    let (rows, cols) = (lhs.rows, rhs.cols);
    let len = rows * cols;
    out.clear();
    out.reserve(len);
    if len > 0 {
        matmul(
            &mut out.spare_capacity_mut()[..len],
            cols,
            Dst::Overwrite,
            lhs,
            rhs,
            scale,
            parallel,
        );
    }
    #[allow(unsafe_code)]
    // SAFETY: `matmul` has overwritten all `rows` rows of `cols` elements, `cols` apart: the first
    // `len` elements.
    unsafe {
        out.set_len(len)
    };
}

/// `dst[r · dst_row_stride + c] (+)= scale · (lhs · rhs)[r, c]` for an `lhs.rows × rhs.cols` result;
/// `parallel` spreads the product over the rayon pool. A destination not yet written
/// (`MaybeUninit`) takes only [`Dst::Overwrite`], and holds the result afterwards.
pub fn matmul<D: Destination>(
    dst: &mut [D],
    dst_row_stride: usize,
    mode: Dst,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    parallel: bool,
) {
    assert!(
        D::INITIALISED || mode == Dst::Overwrite,
        "only initialised memory can be accumulated into"
    );
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert_eq!(rhs.rows, k, "inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "empty inner dimension");
    assert!(dst_row_stride >= n, "destination rows overlap");
    assert!(
        dst.len() > (m - 1) * dst_row_stride + (n - 1),
        "destination bounds"
    );
    assert!(lhs.data.len() > lhs.last_index(), "left operand bounds");
    assert!(rhs.data.len() > rhs.last_index(), "right operand bounds");
    let threads = if parallel {
        rayon::current_num_threads()
    } else {
        1
    };
    let dst = SharedDst(dst.as_mut_ptr().cast::<f32>());
    let accumulate = mode == Dst::Accumulate;
    let product = |block, parallel| {
        #[allow(unsafe_code)]
        // SAFETY: the asserts above keep the whole product inside the three slices and its rows
        // apart (row stride ≥ row length); `dst`, borrowed mutably, overlaps neither operand, `D`
        // has `f32`'s layout, and an accumulating `dst` is initialised. Each call below writes a
        // block of `dst` that no other call writes.
        unsafe {
            gemm_block(
                dst,
                dst_row_stride,
                accumulate,
                lhs,
                rhs,
                scale,
                block,
                parallel,
            )
        }
    };
    if threads < 2 || !(TILED_FLOPS..TILED_MAX).contains(&(2 * m * n * k)) {
        product([0..m, 0..n], parallel);
        return;
    }
    let [rows, cols] = tile_size(m, n, threads);
    let blocks: Vec<[std::ops::Range<usize>; 2]> = (0..m)
        .step_by(rows)
        .flat_map(|r| {
            (0..n)
                .step_by(cols)
                .map(move |c| [r..(r + rows).min(m), c..(c + cols).min(n)])
        })
        .collect();
    blocks
        .into_par_iter()
        .for_each(|block| product(block, false));
}

/// Products of this many flops or more, and fewer than [`TILED_MAX`], are shared out as blocks of
/// the destination, one thread to a block, rather than by gemm's own threads. gemm gives each
/// thread an equal share of every block of its loops and waits for both, so a thread that the
/// machine holds up (a virtual machine's neighbours) stalls the other; blocks go to whichever
/// thread is free. Side by side in one process: CLIP-L's text encoder (products of 0.2–0.7
/// GFLOP) 0.87–0.90× the time.
const TILED_FLOPS: usize = 1 << 24;
/// Larger products stay with gemm's threads, which pack each block of the right operand once for
/// both and share it in the cache: as blocks, a 512² UNet step (products of up to 13 GFLOP) took
/// 1.03–1.07× the time.
const TILED_MAX: usize = 1 << 30;

/// Blocks per thread: enough that a thread held up (a shared machine's other tenants) leaves its
/// share to the others.
const BLOCKS_PER_THREAD: usize = 4;

/// Rows and columns of the destination's blocks for `threads` threads: about
/// [`BLOCKS_PER_THREAD`] per thread, split in the ratio of the destination's sides so each block
/// packs little of the operands that other blocks pack again. gemm's AVX-512 kernels store 6
/// destination rows of 64 columns, so blocks are made of whole such tiles where the product has
/// them.
fn tile_size(m: usize, n: usize, threads: usize) -> [usize; 2] {
    let blocks = BLOCKS_PER_THREAD * threads;
    let by_rows = ((blocks * m) as f64 / n as f64)
        .sqrt()
        .round()
        .clamp(1.0, blocks as f64) as usize;
    let by_cols = blocks.div_ceil(by_rows);
    [
        m.div_ceil(by_rows).next_multiple_of(48).min(m),
        n.div_ceil(by_cols).next_multiple_of(64).min(n),
    ]
}

/// The destination's address, shared by the threads that write its blocks.
#[derive(Clone, Copy)]
struct SharedDst(*mut f32);
// SAFETY: each thread writes a block of the destination no other thread touches.
#[allow(unsafe_code)]
unsafe impl Send for SharedDst {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedDst {}

/// The `rows × cols` block of `dst (+)= scale · lhs · rhs`.
///
/// # Safety
/// The block lies inside `dst`'s memory and both operands' slices (which [`matmul`]'s asserts
/// check for the whole product); nothing else reads or writes that block of `dst` meanwhile; an
/// `accumulate`d block is initialised.
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn gemm_block(
    dst: SharedDst,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    [rows, cols]: [std::ops::Range<usize>; 2],
    parallel: bool,
) {
    let (lhs_rs, lhs_cs) = lhs.strides();
    let (rhs_rs, rhs_cs) = rhs.strides();
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller keeps the block inside the slices. Without `read_dst` gemm sets its
    // `alpha` to zero and stores into `dst` without loading it, so `dst` may be uninitialised then.
    unsafe {
        gemm::gemm(
            rows.len(),
            cols.len(),
            lhs.cols,
            dst.0.add(rows.start * dst_row_stride + cols.start),
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr().offset(rows.start as isize * lhs_rs),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr().offset(cols.start as isize * rhs_cs),
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `lhs · rhs` in f64, from row-major `rows × inner` and `inner × cols` arrays.
    fn reference(lhs: &[f32], rhs: &[f32], rows: usize, inner: usize, cols: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * cols];
        for r in 0..rows {
            for i in 0..inner {
                let a = f64::from(lhs[r * inner + i]);
                for c in 0..cols {
                    out[r * cols + c] += a * f64::from(rhs[i * cols + c]);
                }
            }
        }
        out
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| x[(i % rows) * cols + i / rows])
            .collect()
    }

    #[test]
    fn blocks_of_a_shared_product_match_one_product() {
        // Uneven sides: 3 × 3 blocks on three threads, the last row and column of blocks partial.
        let (m, k, n) = (517, 61, 389);
        assert!(2 * m * n * k >= TILED_FLOPS);
        let value = |i: usize| ((i * 7919 % 1009) as f32 - 504.0) / 504.0;
        let lhs: Vec<f32> = (0..m * k).map(value).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| value(i + 17)).collect();
        let expected = reference(&lhs, &rhs, m, k, n);
        let (lhs_t, rhs_t) = (transpose(&lhs, m, k), transpose(&rhs, k, n));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (transposed, accumulate) in [(false, false), (true, false), (false, true), (true, true)]
        {
            let (a, b) = if transposed {
                (
                    Matrix::transpose_of(&lhs_t, m, k, m),
                    Matrix::transpose_of(&rhs_t, k, n, k),
                )
            } else {
                (Matrix::new(&lhs, m, k, k), Matrix::new(&rhs, k, n, n))
            };
            // Rows 3 wider than the product, whose padding must stay untouched.
            let stride = n + 3;
            let mut dst = vec![2f32; m * stride];
            let mode = if accumulate {
                Dst::Accumulate
            } else {
                Dst::Overwrite
            };
            pool.install(|| matmul(&mut dst, stride, mode, a, b, 0.5, true));
            for r in 0..m {
                for c in 0..stride {
                    let got = f64::from(dst[r * stride + c]);
                    let want = match (c < n, accumulate) {
                        (false, _) => 2.0,
                        (true, false) => 0.5 * expected[r * n + c],
                        (true, true) => 2.0 + 0.5 * expected[r * n + c],
                    };
                    assert!(
                        (got - want).abs() < 1e-4,
                        "({r}, {c}), transposed {transposed}, accumulate {accumulate}: {got} ≠ {want}"
                    );
                }
            }
        }
    }
}
