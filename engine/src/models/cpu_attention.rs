//! Scaled dot-product attention for the CPU backend: for each head and block of queries, the scores
//! `Q Kᵀ` by one matrix product, the softmax's exponentials in place, then `P V` by another, divided
//! by the exponentials' sums on its narrower rows. The block is sized so its scores stay in cache,
//! so 64×64 latents never hold a 4096×4096 score matrix per head in memory.
//! Burn's fused CPU kernel does the same products 64 keys at a time and reaches about a third of the
//! machine's matrix-multiply rate on Stable Diffusion's 4096-token self-attention; this runs both
//! products at full rate (the `gemm` crate, which Burn's CPU backend itself uses).

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::cpu_conv::flex;
use super::cpu_gemm::{Dst, Matrix, matmul, mul_add, product_into, vectorized};

/// Query rows per block: 256 rows × 4096 keys of f32 scores is 4 MiB.
const BLOCK: usize = 256;

/// Whether this kernel pays off: enough keys that the products dominate.
pub fn worthwhile(queries: usize, keys: usize) -> bool {
    queries * keys >= 256 * 1024
}

/// softmax(Q Kᵀ / √d) V for every head, read where the projections put it and written the same
/// way, so no head is split out of the projections or merged back by a copy.
///
/// # Shapes
/// q: [batch, len_q, heads · d], k: [batch, len_kv, heads · d], v: [batch, len_kv, heads · dv]
/// → [batch, len_q, heads · dv]
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    let [batch, len_q, width] = q.dims();
    let [_, len_kv, width_v] = v.dims();
    assert_eq!(k.dims(), [batch, len_kv, width], "key shape");
    assert_eq!(v.dims()[0], batch, "value batch");
    assert!(
        heads > 0 && width.is_multiple_of(heads) && width_v.is_multiple_of(heads),
        "{width} and {width_v} wide projections do not split into {heads} heads"
    );
    let (d, dv) = (width / heads, width_v / heads);
    let device = q.device();
    let (q, q_start) = flex(q);
    let (k, k_start) = flex(k);
    let (v, v_start) = flex(v);
    let q = &q.storage::<f32>()[q_start..][..batch * len_q * width];
    let k = &k.storage::<f32>()[k_start..][..batch * len_kv * width];
    let v = &v.storage::<f32>()[v_start..][..batch * len_kv * width_v];
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0f32; batch * len_q * width_v];
    out.par_chunks_mut(len_q * width_v)
        .zip(q.par_chunks(len_q * width))
        .zip(
            k.par_chunks(len_kv * width)
                .zip(v.par_chunks(len_kv * width_v)),
        )
        .for_each(|((out, q), (k, v))| {
            out.par_chunks_mut(BLOCK * width_v)
                .zip(q.par_chunks(BLOCK * width))
                .for_each(|(out, q)| {
                    let rows = q.len() / width;
                    let mut scores = Vec::new();
                    for head in 0..heads {
                        // scores = scale · Q Kᵀ (K row-major, read as its transpose)
                        product_into(
                            &mut scores,
                            Matrix::new(&q[head * d..], rows, d, width),
                            Matrix::transpose_of(&k[head * d..], d, len_kv, width),
                            scale,
                            false,
                        );
                        let mut inverse_sums = [0f32; BLOCK];
                        for (row, inverse) in scores.chunks_exact_mut(len_kv).zip(&mut inverse_sums)
                        {
                            *inverse = exponentiate_in_place(row);
                        }
                        // The softmax's division happens on the dv-wide result rows instead of
                        // the len_kv-wide score rows.
                        let out = &mut out[head * dv..];
                        matmul(
                            out,
                            width_v,
                            Dst::Overwrite,
                            Matrix::new(&scores, rows, len_kv, len_kv),
                            Matrix::new(&v[head * dv..], len_kv, dv, width_v),
                            1.0,
                            false,
                        );
                        for (row, inverse) in out.chunks_mut(width_v).zip(&inverse_sums[..rows]) {
                            row[..dv].iter_mut().for_each(|x| *x *= inverse);
                        }
                    }
                });
        });
    Tensor::from_data(TensorData::new(out, [batch, len_q, width_v]), &device)
}

/// A softmax's numerators in place, `e^(x − max)`, and the reciprocal of their sum, which the
/// softmax multiplies them by.
fn exponentiate_in_place(row: &mut [f32]) -> f32 {
    let mut inverse = 0.0;
    exponentiate(row, &mut inverse);
    inverse
}

vectorized! {
    /// [`exponentiate_in_place`]'s numerically stable two passes (max, then the exponentials and
    /// their sum), each over eight independent lanes so the compiler vectorises them.
    fn exponentiate(row: &mut [f32], inverse_sum: &mut f32) {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let mut chunks = row.chunks_exact(8);
        for chunk in &mut chunks {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                *m = if x > *m { x } else { *m };
            }
        }
        let max = chunks
            .remainder()
            .iter()
            .chain(&lanes)
            .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });

        let mut sums = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for chunk in &mut chunks {
            for (s, x) in sums.iter_mut().zip(chunk) {
                *x = exp::<FMA>(*x - max);
                *s += *x;
            }
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp::<FMA>(*x - max);
            sum += *x;
        }

        *inverse_sum = 1.0 / sum;
    }
}

/// eˣ for x ≤ 0 in plain arithmetic the compiler vectorises: 2ⁿ·eʳ with r in [−ln2/2, ln2/2] and a
/// degree-6 Taylor polynomial (relative error below 3e-7 there), with fused multiply-adds where
/// `FMA` says the CPU has them.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5·2²³ + 127 rounds to the nearest integer n and leaves n + 127, the exponent field
    // of 2ⁿ, in the low mantissa bits of the sum (whose bits are those of 1.5·2²³ plus n + 127);
    // subtracting it again gives n as a float. For x ≥ −87, n + 127 ≥ 1: a normal 2ⁿ.
    const ROUND: f32 = 12_582_912.0 + 127.0;
    let x = x.max(-87.0);
    let shifted = mul_add::<FMA>(x, LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = mul_add::<FMA>(-n, LN2_LO, mul_add::<FMA>(-n, LN2_HI, x));
    let mut p = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = mul_add::<FMA>(p, r, c);
    }
    // 2ⁿ: the low bits moved into the exponent field; 1.5·2²³'s own bits all shift out.
    f32::from_bits(shifted.to_bits() << 23) * p
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::attention as reference;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution};

    #[test]
    fn matches_burns_attention() {
        let device = Device::flex();
        let n = Distribution::Normal(0.0, 1.5);
        // Uneven sizes: a partial last block, keys ≠ queries, value width ≠ key width.
        let (batch, heads, len_q, len_kv, d, dv) = (2, 3, 300, 77, 16, 24);
        let q = Tensor::<3>::random([batch, len_q, heads * d], n, &device);
        let k = Tensor::<3>::random([batch, len_kv, heads * d], n, &device);
        let v = Tensor::<3>::random([batch, len_kv, heads * dv], n, &device);
        let split =
            |x: Tensor<3>, len, width| x.reshape([batch, len, heads, width]).swap_dims(1, 2);
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: false,
        };
        let expected = reference(
            split(q.clone(), len_q, d),
            split(k.clone(), len_kv, d),
            split(v.clone(), len_kv, dv),
            None,
            None,
            options,
        )
        .swap_dims(1, 2)
        .reshape([batch, len_q, heads * dv]);
        let expected: Vec<f32> = expected.into_data().try_to_vec::<f32>().unwrap();
        let actual = attention(q, k, v, heads);
        assert_eq!(actual.dims(), [batch, len_q, heads * dv]);
        let actual: Vec<f32> = actual.into_data().try_to_vec::<f32>().unwrap();
        let error = actual
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(error < 1e-5, "max error {error}");
    }

    #[test]
    fn softmax_matches_the_definition() {
        for len in [1, 7, 8, 77, 4096] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.7)
                .collect();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let total: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let mut got = row.clone();
            let inverse = exponentiate_in_place(&mut got);
            for (&x, &g) in row.iter().zip(&got) {
                let g = g * inverse;
                let want = (x as f64 - max).exp() / total;
                assert!((g as f64 - want).abs() <= 1e-5 * want, "{g} vs {want}");
            }
        }
    }

    #[test]
    fn exp_is_accurate_where_softmax_uses_it() {
        // Both builds: separate products and sums, and fused multiply-adds.
        for exp in [exp::<false>, exp::<true>] {
            for i in 0..10_000 {
                let x = -(i as f32) * 0.0087;
                let (got, want) = (exp(x), x.exp());
                assert!(
                    (got - want).abs() <= 1e-6 * want.max(1e-30),
                    "exp({x}) = {got}, not {want}"
                );
            }
            assert!(exp(-200.0) < 1e-37, "underflow clamps to a tiny value");
        }
    }
}
