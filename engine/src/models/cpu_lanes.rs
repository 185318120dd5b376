//! Vector registers for element-wise kernels that work on several independent items at once, one
//! per lane: the Winograd transforms keep the same position of neighbouring tiles in one register,
//! so each addition in a transform is one instruction for all of them.
//!
//! Written as plain `[f32; 8]` arrays, these loops came out of the compiler with gathers (and
//! `memset` calls for the arrays of them) once the tile size was known at compile time, at a
//! fraction of the speed. The x86-64 types hold an AVX or AVX-512 register instead, and the
//! portable one serves other CPUs. A value of an x86-64 type exists only where the CPU has its
//! instructions: making one ([`Lanes::load`]) is unsafe, and what follows from a value is not.

// Intrinsics, and the loads that vouch for them.
#![allow(unsafe_code)]

use std::ops::{Add, Mul, Sub};

/// The most lanes any [`Lanes`] type has.
pub const MAX_WIDTH: usize = 16;

/// `WIDTH` floats in one vector register, with element-wise arithmetic.
pub trait Lanes: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<f32, Output = Self> {
    const WIDTH: usize;

    /// The first `WIDTH` of `values`.
    ///
    /// # Safety
    /// The CPU has the instructions the type is written for.
    unsafe fn load(values: &[f32]) -> Self;

    /// `x` in every lane.
    ///
    /// # Safety
    /// As for [`Lanes::load`].
    unsafe fn splat(x: f32) -> Self;

    /// Into the first `WIDTH` of `out`.
    fn store(self, out: &mut [f32]);

    /// The first `lanes` of `values`, zeros in the other lanes.
    ///
    /// # Safety
    /// As for [`Lanes::load`].
    #[inline(always)]
    unsafe fn load_first(values: &[f32], lanes: usize) -> Self {
        let mut whole = [0f32; MAX_WIDTH];
        whole[..lanes].copy_from_slice(&values[..lanes]);
        // SAFETY: the caller's.
        unsafe { Self::load(&whole) }
    }

    /// The first `lanes` lanes into the first `lanes` of `out`.
    #[inline(always)]
    fn store_first(self, out: &mut [f32], lanes: usize) {
        let mut whole = [0f32; MAX_WIDTH];
        self.store(&mut whole);
        out[..lanes].copy_from_slice(&whole[..lanes]);
    }

    /// `out[M·l + i] = rows[i][l]` for every lane `l`: the `M` values of each lane side by side.
    #[inline(always)]
    fn interleave<const M: usize>(rows: [Self; M], out: &mut [f32]) {
        interleave_by_lane(rows, out);
    }

    /// The nine taps of `WIDTH` 3×3 kernels (`kernels`: `WIDTH` runs of nine values), a tap per
    /// register: lane `l` of tap `t` is `kernels[9·l + t]`.
    ///
    /// # Safety
    /// As for [`Lanes::load`].
    #[inline(always)]
    unsafe fn taps(kernels: &[f32]) -> [Self; 9] {
        let kernels = &kernels[..9 * Self::WIDTH];
        let mut rows = [[0f32; MAX_WIDTH]; 9];
        for (l, kernel) in kernels.chunks_exact(9).enumerate() {
            for (row, &tap) in rows.iter_mut().zip(kernel) {
                row[l] = tap;
            }
        }
        // SAFETY (both): the caller's. A loop, not `map`: a closure is compiled without the
        // caller's instructions.
        let mut taps = [unsafe { Self::splat(0.0) }; 9];
        for (tap, row) in taps.iter_mut().zip(&rows) {
            *tap = unsafe { Self::load(row) };
        }
        taps
    }

    /// Into the first `WIDTH` of `out`, past the caches where the CPU can: for results read back
    /// only after more has been written than the caches hold. [`Lanes::fence`] orders them before
    /// what the thread stores next.
    #[inline(always)]
    fn stream(self, out: &mut [f32]) {
        let out = &mut out[..Self::WIDTH];
        if out.as_ptr().addr().is_multiple_of(4 * Self::WIDTH) {
            self.stream_aligned(out);
        } else {
            self.store(out);
        }
    }

    /// [`Lanes::stream`] into `out`, whose first `WIDTH` floats start on a multiple of their size
    /// (as the x86-64 instructions need).
    #[inline(always)]
    fn stream_aligned(self, out: &mut [f32]) {
        self.store(out);
    }

    /// Makes the [`Lanes::stream`]ed stores visible to other threads before any later store: a
    /// store fence on x86-64 (part of its baseline SSE), nothing elsewhere.
    #[inline(always)]
    fn fence() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE, which every x86-64 CPU has.
        unsafe {
            std::arch::x86_64::_mm_sfence()
        }
    }
}

/// [`Lanes::interleave`] a lane at a time.
#[inline(always)]
fn interleave_by_lane<V: Lanes, const M: usize>(rows: [V; M], out: &mut [f32]) {
    let mut lanes = [[0f32; MAX_WIDTH]; M];
    for (row, lanes) in rows.iter().zip(&mut lanes) {
        row.store(lanes);
    }
    for (l, values) in out[..M * V::WIDTH].chunks_exact_mut(M).enumerate() {
        for (value, lanes) in values.iter_mut().zip(&lanes) {
            *value = lanes[l];
        }
    }
}

/// Eight lanes as an array, for CPUs without AVX2 and FMA and for other architectures: the
/// compiler picks the vectors they have.
#[derive(Clone, Copy)]
pub struct Portable([f32; 8]);

impl Lanes for Portable {
    const WIDTH: usize = 8;

    #[inline(always)]
    unsafe fn load(values: &[f32]) -> Self {
        Self(values[..8].try_into().expect("eight values"))
    }

    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Self([x; 8])
    }

    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        out[..8].copy_from_slice(&self.0);
    }
}

impl Add for Portable {
    type Output = Self;
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] + other.0[l]))
    }
}

impl Sub for Portable {
    type Output = Self;
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] - other.0[l]))
    }
}

impl Mul<f32> for Portable {
    type Output = Self;
    #[inline(always)]
    fn mul(self, k: f32) -> Self {
        Self(self.0.map(|x| x * k))
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::first_lanes;
#[cfg(target_arch = "x86_64")]
pub use x86::{Avx, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! Every intrinsic here needs AVX or AVX-512F, which the CPU has wherever a value of the type
    //! that calls it exists (see the module notes): that is the safety argument of each
    //! `unsafe` block below.

    use std::arch::x86_64::*;
    use std::ops::{Add, Mul, Sub};

    use super::{Lanes, interleave_by_lane};

    /// Eight lanes in an AVX register.
    #[derive(Clone, Copy)]
    pub struct Avx(__m256);

    /// A mask of AVX's first `lanes` lanes (all of them from 8).
    ///
    /// # Safety
    /// The CPU has AVX.
    #[inline(always)]
    pub(crate) unsafe fn first_lanes(lanes: usize) -> __m256i {
        // SAFETY: AVX, as the caller vouches.
        unsafe {
            let index = _mm256_setr_ps(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0);
            let below = _mm256_cmp_ps::<_CMP_LT_OQ>(index, _mm256_set1_ps(lanes as f32));
            _mm256_castps_si256(below)
        }
    }

    impl Lanes for Avx {
        const WIDTH: usize = 8;

        #[inline(always)]
        unsafe fn load(values: &[f32]) -> Self {
            let values = &values[..8];
            // SAFETY: eight floats to read; the caller vouches for AVX.
            unsafe { Self(_mm256_loadu_ps(values.as_ptr())) }
        }

        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: the caller vouches for AVX.
            unsafe { Self(_mm256_set1_ps(x)) }
        }

        #[inline(always)]
        fn store(self, out: &mut [f32]) {
            let out = &mut out[..8];
            // SAFETY: eight floats to write; AVX as the module notes say.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), self.0) }
        }

        /// One masked load: a copy of a variable length is a library call.
        #[inline(always)]
        unsafe fn load_first(values: &[f32], lanes: usize) -> Self {
            let values = &values[..lanes.min(8)];
            // SAFETY: the masked load reads only the lanes below `values.len()`, which are in
            // `values`; AVX as the caller vouches.
            unsafe {
                Self(_mm256_maskload_ps(
                    values.as_ptr(),
                    first_lanes(values.len()),
                ))
            }
        }

        /// One masked store: a copy of a variable length is a library call.
        #[inline(always)]
        fn store_first(self, out: &mut [f32], lanes: usize) {
            let out = &mut out[..lanes.min(8)];
            // SAFETY: the masked store writes only the lanes below `out.len()`, which are in
            // `out`; AVX as the module notes say.
            unsafe { _mm256_maskstore_ps(out.as_mut_ptr(), first_lanes(out.len()), self.0) }
        }

        /// Transposes in registers for a pair or four: unpacking pairs of lanes, then swapping
        /// halves of the register. (No closures here: one is compiled without AVX, and its
        /// intrinsics would be calls.)
        #[inline(always)]
        fn interleave<const M: usize>(rows: [Self; M], out: &mut [f32]) {
            let out = &mut out[..M * 8];
            let r = |i: usize| rows[i].0;
            // SAFETY: AVX as the module notes say.
            unsafe {
                if M == 2 {
                    // Lanes 0, 1, 4, 5 of the two rows and then 2, 3, 6, 7, in pairs.
                    let low = _mm256_unpacklo_ps(r(0), r(1));
                    let high = _mm256_unpackhi_ps(r(0), r(1));
                    Self(_mm256_permute2f128_ps::<0x20>(low, high)).store(out);
                    Self(_mm256_permute2f128_ps::<0x31>(low, high)).store(&mut out[8..]);
                } else if M == 4 {
                    let (a, b) = (
                        _mm256_unpacklo_ps(r(0), r(1)),
                        _mm256_unpacklo_ps(r(2), r(3)),
                    );
                    let (c, d) = (
                        _mm256_unpackhi_ps(r(0), r(1)),
                        _mm256_unpackhi_ps(r(2), r(3)),
                    );
                    // Lanes (0, 4), (1, 5), (2, 6) and (3, 7) of the four rows.
                    let l04 = _mm256_shuffle_ps::<0x44>(a, b);
                    let l15 = _mm256_shuffle_ps::<0xEE>(a, b);
                    let l26 = _mm256_shuffle_ps::<0x44>(c, d);
                    let l37 = _mm256_shuffle_ps::<0xEE>(c, d);
                    Self(_mm256_permute2f128_ps::<0x20>(l04, l15)).store(out);
                    Self(_mm256_permute2f128_ps::<0x20>(l26, l37)).store(&mut out[8..]);
                    Self(_mm256_permute2f128_ps::<0x31>(l04, l15)).store(&mut out[16..]);
                    Self(_mm256_permute2f128_ps::<0x31>(l26, l37)).store(&mut out[24..]);
                } else {
                    interleave_by_lane(rows, out);
                }
            }
        }

        /// Taps 0–7 by an 8×8 transpose in registers (unpacking pairs, then pairs of pairs, then
        /// swapping halves), tap 8 value by value. A value at a time, the copying took about half
        /// of the weight transform's time.
        #[inline(always)]
        unsafe fn taps(kernels: &[f32]) -> [Self; 9] {
            let k = &kernels[..72];
            // SAFETY: AVX as the caller vouches; kernel c's taps 0–7 are the eight floats from
            // 9c, which for c ≤ 7 end at 71, inside `k`.
            unsafe {
                let p = k.as_ptr();
                let mut r = [_mm256_setzero_ps(); 8];
                for (c, r) in r.iter_mut().enumerate() {
                    *r = _mm256_loadu_ps(p.add(9 * c));
                }
                // Taps (0, 1, 4, 5) and (2, 3, 6, 7) of kernels 2i and 2i + 1, alternately.
                let mut pairs = [_mm256_setzero_ps(); 8];
                for i in 0..4 {
                    pairs[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
                    pairs[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
                }
                // Taps (t, t + 4) of kernels 4h–4h + 3, for t = 0, 1, 2, 3 in quads[4h + t].
                let mut quads = [_mm256_setzero_ps(); 8];
                for h in 0..2 {
                    let (a, b) = (pairs[4 * h], pairs[4 * h + 2]);
                    let (c, d) = (pairs[4 * h + 1], pairs[4 * h + 3]);
                    quads[4 * h] = _mm256_shuffle_ps::<0x44>(a, b);
                    quads[4 * h + 1] = _mm256_shuffle_ps::<0xEE>(a, b);
                    quads[4 * h + 2] = _mm256_shuffle_ps::<0x44>(c, d);
                    quads[4 * h + 3] = _mm256_shuffle_ps::<0xEE>(c, d);
                }
                let mut taps = [Self(_mm256_setzero_ps()); 9];
                for t in 0..4 {
                    taps[t] = Self(_mm256_permute2f128_ps::<0x20>(quads[t], quads[4 + t]));
                    taps[4 + t] = Self(_mm256_permute2f128_ps::<0x31>(quads[t], quads[4 + t]));
                }
                taps[8] = Self(_mm256_setr_ps(
                    k[8], k[17], k[26], k[35], k[44], k[53], k[62], k[71],
                ));
                taps
            }
        }

        #[inline(always)]
        fn stream_aligned(self, out: &mut [f32]) {
            let out = &mut out[..8];
            assert!(out.as_ptr().addr().is_multiple_of(32), "32-byte aligned");
            // SAFETY: 8 aligned floats to write, as the instruction needs; AVX (module notes).
            unsafe { _mm256_stream_ps(out.as_mut_ptr(), self.0) }
        }
    }

    impl Add for Avx {
        type Output = Self;
        #[inline(always)]
        fn add(self, other: Self) -> Self {
            // SAFETY: AVX as the module notes say.
            unsafe { Self(_mm256_add_ps(self.0, other.0)) }
        }
    }

    impl Sub for Avx {
        type Output = Self;
        #[inline(always)]
        fn sub(self, other: Self) -> Self {
            // SAFETY: AVX as the module notes say.
            unsafe { Self(_mm256_sub_ps(self.0, other.0)) }
        }
    }

    impl Mul<f32> for Avx {
        type Output = Self;
        #[inline(always)]
        fn mul(self, k: f32) -> Self {
            // SAFETY: AVX as the module notes say.
            unsafe { Self(_mm256_mul_ps(self.0, _mm256_set1_ps(k))) }
        }
    }

    /// Sixteen lanes in an AVX-512 register.
    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    /// Lane indices for `_mm512_permutex2var_ps`: 0–15 pick from the first register, 16–31 from
    /// the second. Lanes 0–7 of two registers, alternately, and then lanes 8–15.
    const PAIRS_LOW: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
    const PAIRS_HIGH: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
    /// Pairs 0–3 of two registers of pairs, alternately, and then pairs 4–7.
    const QUADS_LOW: [i32; 16] = [0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23];
    const QUADS_HIGH: [i32; 16] = [8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31];

    impl Lanes for Avx512 {
        const WIDTH: usize = 16;

        #[inline(always)]
        unsafe fn load(values: &[f32]) -> Self {
            let values = &values[..16];
            // SAFETY: sixteen floats to read; the caller vouches for AVX-512F.
            unsafe { Self(_mm512_loadu_ps(values.as_ptr())) }
        }

        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            // SAFETY: the caller vouches for AVX-512F.
            unsafe { Self(_mm512_set1_ps(x)) }
        }

        #[inline(always)]
        fn store(self, out: &mut [f32]) {
            let out = &mut out[..16];
            // SAFETY: sixteen floats to write; AVX-512F as the module notes say.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), self.0) }
        }

        /// Transposes in registers for a pair or four, by two-register permutations.
        #[inline(always)]
        fn interleave<const M: usize>(rows: [Self; M], out: &mut [f32]) {
            let out = &mut out[..M * 16];
            let r = |i: usize| rows[i].0;
            // SAFETY: AVX-512F as the module notes say; each index load reads the sixteen `i32`s
            // of a constant.
            unsafe {
                let pairs_low = _mm512_loadu_epi32(PAIRS_LOW.as_ptr());
                let pairs_high = _mm512_loadu_epi32(PAIRS_HIGH.as_ptr());
                if M == 2 {
                    Self(_mm512_permutex2var_ps(r(0), pairs_low, r(1))).store(out);
                    Self(_mm512_permutex2var_ps(r(0), pairs_high, r(1))).store(&mut out[16..]);
                } else if M == 4 {
                    let quads_low = _mm512_loadu_epi32(QUADS_LOW.as_ptr());
                    let quads_high = _mm512_loadu_epi32(QUADS_HIGH.as_ptr());
                    // Rows 0 and 1, and rows 2 and 3, in pairs: lanes 0–7 and lanes 8–15.
                    let a = _mm512_permutex2var_ps(r(0), pairs_low, r(1));
                    let b = _mm512_permutex2var_ps(r(2), pairs_low, r(3));
                    let c = _mm512_permutex2var_ps(r(0), pairs_high, r(1));
                    let d = _mm512_permutex2var_ps(r(2), pairs_high, r(3));
                    Self(_mm512_permutex2var_ps(a, quads_low, b)).store(out);
                    Self(_mm512_permutex2var_ps(a, quads_high, b)).store(&mut out[16..]);
                    Self(_mm512_permutex2var_ps(c, quads_low, d)).store(&mut out[32..]);
                    Self(_mm512_permutex2var_ps(c, quads_high, d)).store(&mut out[48..]);
                } else {
                    interleave_by_lane(rows, out);
                }
            }
        }

        #[inline(always)]
        fn stream_aligned(self, out: &mut [f32]) {
            let out = &mut out[..16];
            assert!(out.as_ptr().addr().is_multiple_of(64), "64-byte aligned");
            // SAFETY: 16 aligned floats to write, as the instruction needs; AVX-512F (module notes).
            unsafe { _mm512_stream_ps(out.as_mut_ptr(), self.0) }
        }
    }

    impl Add for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn add(self, other: Self) -> Self {
            // SAFETY: AVX-512F as the module notes say.
            unsafe { Self(_mm512_add_ps(self.0, other.0)) }
        }
    }

    impl Sub for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn sub(self, other: Self) -> Self {
            // SAFETY: AVX-512F as the module notes say.
            unsafe { Self(_mm512_sub_ps(self.0, other.0)) }
        }
    }

    impl Mul<f32> for Avx512 {
        type Output = Self;
        #[inline(always)]
        fn mul(self, k: f32) -> Self {
            // SAFETY: AVX-512F as the module notes say.
            unsafe { Self(_mm512_mul_ps(self.0, _mm512_set1_ps(k))) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `check::<V>()` for every lane type whose instructions this CPU has.
    macro_rules! for_each_lane_type {
        ($check:ident) => {{
            $check::<Portable>();
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx") {
                    $check::<Avx>();
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    $check::<Avx512>();
                }
            }
        }};
    }

    /// A register's first lanes load from and store into a slice just that long, the other lanes
    /// loading as zeros and the floats past it left alone.
    #[test]
    fn first_lanes_stay_inside_their_slice() {
        fn check<V: Lanes>() {
            let values: Vec<f32> = (1..=V::WIDTH).map(|i| i as f32).collect();
            for lanes in 0..=V::WIDTH {
                // SAFETY: only called for types whose instructions the CPU has.
                let x = unsafe { V::load_first(&values[..lanes], lanes) };
                let mut all = [f32::NAN; MAX_WIDTH];
                x.store(&mut all);
                let loaded: Vec<f32> = (0..V::WIDTH)
                    .map(|l| if l < lanes { values[l] } else { 0.0 })
                    .collect();
                assert_eq!(all[..V::WIDTH], loaded[..], "{lanes} lanes loaded");
                let mut out = vec![-1.0; V::WIDTH + 1];
                x.store_first(&mut out, lanes);
                let stored: Vec<f32> = (0..=V::WIDTH)
                    .map(|l| if l < lanes { values[l] } else { -1.0 })
                    .collect();
                assert_eq!(out, stored, "{lanes} lanes stored");
            }
        }
        for_each_lane_type!(check);
    }

    /// Every lane type this CPU has interleaves pairs and fours as lane-at-a-time copying does.
    #[test]
    fn interleaving_matches_lane_by_lane() {
        fn check<V: Lanes>() {
            let values: Vec<f32> = (0..4 * V::WIDTH).map(|i| i as f32).collect();
            // SAFETY: only called for types whose instructions the CPU has.
            let rows: [V; 4] = std::array::from_fn(|i| unsafe { V::load(&values[i * V::WIDTH..]) });
            let expected = |m: usize| -> Vec<f32> {
                (0..m * V::WIDTH)
                    .map(|k| values[(k % m) * V::WIDTH + k / m])
                    .collect()
            };
            let mut out = vec![f32::NAN; 4 * V::WIDTH];
            V::interleave([rows[0], rows[1]], &mut out);
            assert_eq!(out[..2 * V::WIDTH], expected(2)[..], "pairs");
            V::interleave(rows, &mut out);
            assert_eq!(out, expected(4), "fours");
            V::interleave([rows[0], rows[1], rows[2]], &mut out);
            assert_eq!(out[..3 * V::WIDTH], expected(3)[..], "threes");
        }
        for_each_lane_type!(check);
    }

    /// Every lane type this CPU has gathers kernels' taps into registers, and streams values to
    /// aligned and unaligned places, as plain copying does.
    #[test]
    fn taps_and_streamed_stores_match_copying() {
        fn check<V: Lanes>() {
            let kernels: Vec<f32> = (0..9 * V::WIDTH).map(|i| i as f32 * 0.5 - 7.0).collect();
            // SAFETY: only called for types whose instructions the CPU has.
            let taps = unsafe { V::taps(&kernels) };
            for (t, tap) in taps.iter().enumerate() {
                let mut lanes = [f32::NAN; MAX_WIDTH];
                tap.store(&mut lanes);
                let expected: Vec<f32> = (0..V::WIDTH).map(|l| kernels[9 * l + t]).collect();
                assert_eq!(lanes[..V::WIDTH], expected[..], "tap {t}");
            }
            // Every offset from a 64-byte boundary, so aligned and unaligned stores are both
            // taken.
            #[repr(C, align(64))]
            struct Aligned([f32; 2 * MAX_WIDTH]);
            for offset in 0..MAX_WIDTH {
                let mut out = Aligned([f32::NAN; 2 * MAX_WIDTH]);
                taps[offset % 9].stream(&mut out.0[offset..]);
                V::fence();
                let expected: Vec<f32> =
                    (0..V::WIDTH).map(|l| kernels[9 * l + offset % 9]).collect();
                assert_eq!(out.0[offset..][..V::WIDTH], expected[..], "offset {offset}");
            }
        }
        for_each_lane_type!(check);
    }
}
