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
/// `parallel` lets gemm spread the product over the rayon pool. A destination not yet written
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
    let (lhs_rs, lhs_cs) = lhs.strides();
    let (rhs_rs, rhs_cs) = rhs.strides();
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    #[allow(unsafe_code)]
    // SAFETY: the asserts above keep every element gemm addresses inside the three slices, and
    // distinct destination elements apart (row stride ≥ row length); `dst` is borrowed mutably, so
    // it overlaps neither operand, and `D` has `f32`'s layout. Without `read_dst` gemm sets its
    // `alpha` to zero and stores into `dst` without loading it, so `dst` may be uninitialised then;
    // with it, the assert above has made sure it is initialised.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().cast::<f32>(),
            1,
            dst_row_stride as isize,
            mode == Dst::Accumulate,
            lhs.data.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.data.as_ptr(),
            rhs_cs,
            rhs_rs,
            if mode == Dst::Accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}
