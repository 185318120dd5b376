//! Scaled dot-product attention for the CPU backend, one tile of 16 queries and one head at a time:
//! the tile's scores against every key, their softmax, and the values they weight, all while the
//! tile's scores (16 per key: 256 KiB for 4096 keys) stay in the core's L2 cache, so 64×64 latents
//! never hold a 4096×4096 score matrix in memory. Where a head's keys outgrow the L2 cache (the
//! VAE's), a group of up to 8 tiles reads each panel of keys and values together.
//!
//! The scores are kept transposed, a key per row and a query per lane, so the softmax runs down
//! vector lanes and both products are the same register-blocked kernel: a panel of 5 or 6 rows
//! (keys for the scores, value channels for the output) times the 16 query lanes, accumulated in
//! 12 vector registers. Keys and values are copied once per head into those panels, and each block
//! of exponentiated scores (256 keys of a tile, 16 KiB) is read by every panel of values while it
//! is in the L1 cache.
//!
//! Measured side by side in one process on two cores, against two `gemm`-crate products per block
//! of 256 queries (whose 4 MiB of scores live in the L3 cache, and whose keys and values the crate
//! packs again for every block): 0.80–0.89× the time on Stable Diffusion 1.5's 64² self-attention
//! (CFG batch, 8 heads of 40 channels), the same time within the noise at 32², and 1.04–1.07× on
//! the VAE's single 512-channel head at 64², whose 8 MiB of keys a group of tiles reads together.
//! The softmax's exponentials took about a fifth of the time at 64², where a head has only 40
//! multiply-adds per score in each product: the scores are now in powers of two (log₂e folded
//! into the queries' scale, so 2ˣ needs no reduction by ln 2 and a degree-5 fit), four rows at a
//! time, and they take an eighth (SD 1.5's 64² self-attention with a CFG batch on two AVX2 cores,
//! best of five, alternate runs: 300–307 → 270–280 ms; whole 512² steps 0.95–1.0× the time,
//! 0.97× in the median). Burn's fused CPU kernel reaches about a third of the machine's
//! matrix-multiply rate there. On a CPU with AVX-512 the panels grow to 12 keys and 8–12 value
//! channels (see [`Panels`]): 0.72–0.92× the time of 6 and 5 at 64², side by side, and
//! 140–180 GFLOP/s on two cores. There, too, two tiles run through each panel together, so every
//! value broadcast from a panel feeds two multiply-adds, and each tile's lanes sit on cache lines
//! of their own: with both, 0.62–0.93× the time at 64² and 0.69–0.85× at 32² (alternate runs, best
//! of five: 246 → 186 ms and 35 → 24 ms, about 230 GFLOP/s at 64²).

use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::cpu_conv::flex;
use super::cpu_gemm::{mul_add, vectorized, wide_vectors};

/// Queries per tile: the lanes of two 8-wide vectors or of one 16-wide vector.
const TILE: usize = 16;
/// Panel heights (rows of keys or value channels) for the register-blocked products: with
/// AVX-512 a tile's 16 lanes are one register, so a panel of 8–12 rows keeps as many independent
/// sums in flight as 5–6 rows of two 8-wide registers do with AVX2. Fewer rows leave the
/// multiply-add units waiting on their own latency.
#[derive(Clone, Copy, Debug)]
struct Panels {
    /// Keys per panel of the score product.
    keys: usize,
    /// Value channels per panel of the weighted sum.
    values: usize,
    /// Tiles whose products share each value read from a panel: with AVX-512, two tiles' 2 × 8–12
    /// sums fill the 32 registers, and each scalar broadcast from a panel feeds two multiply-adds
    /// instead of one. One broadcast per multiply-add held the products to about half the
    /// multiply-add rate (single-core loops at 64², side by side: 1.1–1.3× faster with two tiles
    /// on the scores, 1.1–1.3× on the weighted sum).
    tiles: usize,
}

impl Panels {
    /// The heights for the vector width [`vectorized`] runs `attend` with on this CPU.
    fn for_this_cpu(dv: usize) -> Panels {
        Panels::new(wide_vectors(), dv)
    }

    /// For value heads of `dv` channels: a height that divides them where one does (40 and 80 in
    /// Stable Diffusion 1.5, 64 in 2.x), so no panel is padding.
    fn new(wide: bool, dv: usize) -> Panels {
        let (keys, choices, tiles) = if wide {
            (12, &[10, 8, 12][..], 2)
        } else {
            (6, &[5, 6][..], 1)
        };
        let values = choices
            .iter()
            .copied()
            .find(|&m| dv.is_multiple_of(m))
            .unwrap_or(*choices.last().unwrap());
        Panels {
            keys,
            values,
            tiles,
        }
    }
}

/// Tasks per thread: a task's tiles run head by head, so each head's keys and values (640 KiB at
/// 64²) are read from the L2 cache by all but the first of them. Fewer, longer tasks measured
/// faster: 4 tiles per task took 8–10% longer at 64² than 64 or more.
const TASKS_PER_THREAD: usize = 4;

/// Bytes of a head's keys per tile of a group ([`attend`]).
const GROUP_KEY_BYTES: usize = 1 << 20;
/// The most tiles in a group.
const MAX_GROUP: usize = 8;

/// One value per query of a tile, on a cache line of its own: a 16-wide load of lanes that
/// straddle two lines costs two loads, which cut the weighted sum's rate by about a third.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Lanes([f32; TILE]);

impl Lanes {
    const ZERO: Lanes = Lanes([0.0; TILE]);
}

impl std::ops::Deref for Lanes {
    type Target = [f32; TILE];
    fn deref(&self) -> &[f32; TILE] {
        &self.0
    }
}

impl std::ops::DerefMut for Lanes {
    fn deref_mut(&mut self) -> &mut [f32; TILE] {
        &mut self.0
    }
}

/// Whether this kernel pays off over Burn's attention: from 64 × 64 scores a head. On Stable
/// Diffusion 1.5's smaller attentions with a CFG batch (two AVX2 cores, best of 10), it took
/// 0.49× Burn's time for 32² cross-attention (1024 queries, 77 keys), 0.62× for 16²
/// self-attention and 0.65–0.67× for 16² cross-attention and 8² self- and cross-attention.
pub fn worthwhile(queries: usize, keys: usize) -> bool {
    queries * keys >= 64 * 64
}

/// softmax(Q Kᵀ / √d) V for every head, read where the projections put it and written the same
/// way, so no head is split out of the projections or merged back by a copy.
///
/// # Shapes
/// q: [batch, len_q, heads · d], k: [batch, len_kv, heads · d], v: [batch, len_kv, heads · dv]
/// → [batch, len_q, heads · dv]
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    let dv = v.dims()[2] / heads.max(1);
    attention_in_panels(q, k, v, heads, Panels::for_this_cpu(dv))
}

/// [`attention`] with the keys and values packed into panels of the given heights.
fn attention_in_panels(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    panels: Panels,
) -> Tensor<3> {
    let [batch, len_q, width] = q.dims();
    let [_, len_kv, width_v] = v.dims();
    assert_eq!(k.dims(), [batch, len_kv, width], "key shape");
    assert_eq!(v.dims()[0], batch, "value batch");
    assert!(
        heads > 0 && width.is_multiple_of(heads) && width_v.is_multiple_of(heads),
        "{width} and {width_v} wide projections do not split into {heads} heads"
    );
    assert!(len_kv > 0, "attention needs at least one key");
    let (d, dv) = (width / heads, width_v / heads);
    let device = q.device();
    let (q, q_start) = flex(q);
    let (k, k_start) = flex(k);
    let (v, v_start) = flex(v);
    let q = &q.storage::<f32>()[q_start..][..batch * len_q * width];
    let k = &k.storage::<f32>()[k_start..][..batch * len_kv * width];
    let v = &v.storage::<f32>()[v_start..][..batch * len_kv * width_v];
    // Scores in powers of two: the softmax's e^(s − max) is 2^(s·log₂e − max·log₂e), and 2ˣ needs
    // no reduction by ln 2 (three operations fewer per score than eˣ).
    let scale = std::f32::consts::LOG2_E / (d as f32).sqrt();

    let key_panels = pack_heads(k, len_kv, width, heads, panels.keys, true);
    let value_panels = pack_heads(v, len_kv, width_v, heads, panels.values, false);
    let padded_keys = len_kv.next_multiple_of(panels.keys);
    let padded_dv = dv.next_multiple_of(panels.values);

    // Tiles that read each panel of keys and values together: one where a head's keys fit in the
    // L2 cache with room to spare, more where they do not (the VAE's 512-channel head: 8 MiB of
    // keys at 64²), so they are not read from memory again for every 16 queries.
    let group = (padded_keys * d * 4 / GROUP_KEY_BYTES).clamp(panels.tiles, MAX_GROUP);
    let tiles = batch * len_q.div_ceil(TILE);
    let tiles_per_task = tiles
        .div_ceil(TASKS_PER_THREAD * rayon::current_num_threads())
        .max(1);
    let mut out = vec![0f32; batch * len_q * width_v];
    out.par_chunks_mut(len_q * width_v)
        .zip(q.par_chunks(len_q * width))
        .enumerate()
        .for_each(|(b, (out, q))| {
            out.par_chunks_mut(tiles_per_task * TILE * width_v)
                .zip(q.par_chunks(tiles_per_task * TILE * width))
                .for_each(|(out, q)| {
                    let mut queries = vec![Lanes::ZERO; group * d];
                    let mut scores = vec![Lanes::ZERO; group * padded_keys];
                    let mut result = vec![Lanes::ZERO; group * padded_dv];
                    for head in 0..heads {
                        let keys =
                            &key_panels[(b * heads + head) * padded_keys * d..][..padded_keys * d];
                        let values = &value_panels[(b * heads + head) * padded_dv * len_kv..]
                            [..padded_dv * len_kv];
                        let (out_group, q_group) = (group * TILE * width_v, group * TILE * width);
                        for (out, q) in out.chunks_mut(out_group).zip(q.chunks(q_group)) {
                            // Each tile's queries, one channel per row, scaled by 1/√d.
                            let in_group = q.len().div_ceil(TILE * width);
                            for (queries, q) in queries.chunks_mut(d).zip(q.chunks(TILE * width)) {
                                for (c, lanes) in queries.iter_mut().enumerate() {
                                    lanes.fill(0.0);
                                    for (lane, row) in lanes.iter_mut().zip(q.chunks(width)) {
                                        *lane = row[head * d + c] * scale;
                                    }
                                }
                            }
                            attend(
                                &queries[..in_group * d],
                                keys,
                                values,
                                len_kv,
                                panels,
                                &mut scores[..in_group * padded_keys],
                                &mut result[..in_group * padded_dv],
                            );
                            let tile_rows = out.chunks_mut(TILE * width_v);
                            for (out, result) in tile_rows.zip(result.chunks(padded_dv)) {
                                for (l, row) in out.chunks_mut(width_v).enumerate() {
                                    let row = &mut row[head * dv..][..dv];
                                    for (x, lanes) in row.iter_mut().zip(result) {
                                        *x = lanes[l];
                                    }
                                }
                            }
                        }
                    }
                });
        });
    Tensor::from_data(TensorData::new(out, [batch, len_q, width_v]), &device)
}

/// Each head's keys or values copied into panels of `per_panel` rows, every panel a run of
/// `per_panel`-wide rows (zeros where a panel reaches past the last key or channel), head after
/// head and batch after batch.
/// - `by_key` (keys): a panel holds `per_panel` keys, one row per channel.
/// - otherwise (values): a panel holds `per_panel` channels, one row per key.
fn pack_heads(
    x: &[f32],
    len: usize,
    width: usize,
    heads: usize,
    per_panel: usize,
    by_key: bool,
) -> Vec<f32> {
    let d = width / heads;
    let size = if by_key {
        len.next_multiple_of(per_panel) * d
    } else {
        d.next_multiple_of(per_panel) * len
    };
    let batch = x.len() / (len * width);
    let mut packed = vec![0f32; batch * heads * size];
    packed
        .par_chunks_mut(size)
        .enumerate()
        .for_each(|(bh, packed)| {
            let (b, head) = (bh / heads, bh % heads);
            let rows = x[b * len * width..][..len * width].chunks_exact(width);
            for (token, row) in rows.enumerate() {
                let row = &row[head * d..][..d];
                if by_key {
                    // Panel token / per_panel, slot token % per_panel of each channel's row.
                    let panel = &mut packed[token / per_panel * d * per_panel..][..d * per_panel];
                    for (slot, &x) in panel[token % per_panel..]
                        .iter_mut()
                        .step_by(per_panel)
                        .zip(row)
                    {
                        *slot = x;
                    }
                } else {
                    // Row `token` of each panel of channels.
                    for (p, channels) in row.chunks(per_panel).enumerate() {
                        packed[(p * len + token) * per_panel..][..channels.len()]
                            .copy_from_slice(channels);
                    }
                }
            }
        });
    packed
}

/// For each of `T` tiles `t`: `out[t·out_stride + m][l] (+)= Σᵢ panel[i][m] · lanes[t·lanes_stride
/// + i][l]`, a panel of `M` rows (`panel.len() / M` long) against each tile's lanes, written over
/// `out` or, with `accumulate`, added to it. In [`vectorized`]'s AVX-512 build (`WIDE`) the `T·M`
/// sums are 16-wide registers and each value of the panel is broadcast once for all `T` tiles;
/// otherwise each tile in turn, in 2·`M` 8-wide registers.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn panel_product<const M: usize, const T: usize, const FMA: bool, const WIDE: bool>(
    panel: &[f32],
    lanes: &[Lanes],
    lanes_stride: usize,
    out: &mut [Lanes],
    out_stride: usize,
    accumulate: bool,
) {
    let rows = panel.len() / M;
    assert!(
        lanes.len() >= (T - 1) * lanes_stride + rows && out.len() >= (T - 1) * out_stride + M,
        "panel product bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if WIDE {
        // Written with intrinsics: from plain loops the compiler builds this product for 16-wide
        // vectors out of gathers and scatters when M is 8 or 12, at a tenth of the speed.
        use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_load_ps, _mm512_set1_ps};
        use std::arch::x86_64::{_mm512_setzero_ps, _mm512_store_ps};
        #[allow(unsafe_code)]
        // SAFETY: `WIDE` is true only in the build `vectorized` runs on CPUs with AVX-512F, which
        // these intrinsics need. Every load and store is of a whole `Lanes`, 64-byte aligned, at
        // an index the assert above keeps inside `lanes` (tile t's row i < rows) or `out` (tile
        // t's row m < M); `panel` is read through its checked chunks.
        unsafe {
            let mut sums: [[__m512; M]; T] = [[_mm512_setzero_ps(); M]; T];
            if accumulate {
                for (t, sums) in sums.iter_mut().enumerate() {
                    for (m, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm512_load_ps(out.as_ptr().add(t * out_stride + m).cast());
                    }
                }
            }
            for (i, a) in panel.as_chunks::<M>().0.iter().enumerate() {
                let mut b: [__m512; T] = [_mm512_setzero_ps(); T];
                for (t, b) in b.iter_mut().enumerate() {
                    *b = _mm512_load_ps(lanes.as_ptr().add(t * lanes_stride + i).cast());
                }
                for m in 0..M {
                    let a = _mm512_set1_ps(a[m]);
                    for t in 0..T {
                        sums[t][m] = _mm512_fmadd_ps(a, b[t], sums[t][m]);
                    }
                }
            }
            for (t, sums) in sums.iter().enumerate() {
                for (m, &sum) in sums.iter().enumerate() {
                    _mm512_store_ps(out.as_mut_ptr().add(t * out_stride + m).cast(), sum);
                }
            }
        }
        return;
    }
    for t in 0..T {
        let lanes = &lanes[t * lanes_stride..][..rows];
        let mut acc = [[0f32; TILE]; M];
        if accumulate {
            for m in 0..M {
                acc[m] = *out[t * out_stride + m];
            }
        }
        for (a, b) in panel.as_chunks::<M>().0.iter().zip(lanes) {
            for m in 0..M {
                for l in 0..TILE {
                    acc[m][l] = mul_add::<FMA>(a[m], b[l], acc[m][l]);
                }
            }
        }
        for m in 0..M {
            out[t * out_stride + m] = Lanes(acc[m]);
        }
    }
}

/// [`panel_product`] for every tile of a group (`tiles` of them, `lanes_stride` and `out_stride`
/// apart): `T` tiles at a time, then one at a time for the rest.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group_product<const M: usize, const T: usize, const FMA: bool, const WIDE: bool>(
    panel: &[f32],
    lanes: &[Lanes],
    lanes_stride: usize,
    out: &mut [Lanes],
    out_stride: usize,
    tiles: usize,
    accumulate: bool,
) {
    let mut t = 0;
    while t + T <= tiles {
        let (lanes, out) = (&lanes[t * lanes_stride..], &mut out[t * out_stride..]);
        panel_product::<M, T, FMA, WIDE>(panel, lanes, lanes_stride, out, out_stride, accumulate);
        t += T;
    }
    while t < tiles {
        let (lanes, out) = (&lanes[t * lanes_stride..], &mut out[t * out_stride..]);
        panel_product::<M, 1, FMA, WIDE>(panel, lanes, lanes_stride, out, out_stride, accumulate);
        t += 1;
    }
}

/// Keys per block of the weighted sum, for one tile at a time: a block's probabilities (16 KiB)
/// stay in the L1 cache while every panel of values reads them. Tiles read together share it.
const KEY_BLOCK: usize = 256;

/// The output of a group of tiles for one head (`result`, for each tile one value channel per
/// row): the softmax of the scores, `e^(s − max)` over its sum, weighting the values,
/// `Σ_key p[key][l] · v[key][c]`. A block of keys is exponentiated in place and then read by every
/// panel of values while it is in the L1 cache (L2 for a group), and each block of a panel of values
/// is read by every tile of the group while it is in L1.
#[inline(always)]
fn weigh<const M: usize, const T: usize, const FMA: bool, const WIDE: bool>(
    values: &[f32],
    len_kv: usize,
    padded_keys: usize,
    scores: &mut [Lanes],
    max: &[Lanes; MAX_GROUP],
    result: &mut [Lanes],
) {
    let tiles = scores.len() / padded_keys;
    let padded_dv = result.len() / tiles;
    result.fill(Lanes::ZERO);
    // Two sums per lane, alternate keys, so no lane adds thousands of terms in one chain.
    let mut sums = [[[0f32; TILE]; 2]; MAX_GROUP];
    for start in (0..len_kv).step_by(KEY_BLOCK / T) {
        let keys = (KEY_BLOCK / T).min(len_kv - start);
        for ((scores, sums), max) in scores.chunks_mut(padded_keys).zip(&mut sums).zip(max) {
            // Four rows at a time: eight independent exponentials in flight, whose chains of
            // dependent operations would otherwise leave the vector units waiting.
            let (quads, last) = scores[start..][..keys].as_chunks_mut::<4>();
            for quad in quads {
                for (i, row) in quad.iter_mut().enumerate() {
                    for l in 0..TILE {
                        row[l] = exp2::<FMA>(row[l] - max[l]);
                        sums[i % 2][l] += row[l];
                    }
                }
            }
            for row in last {
                for l in 0..TILE {
                    row[l] = exp2::<FMA>(row[l] - max[l]);
                    sums[0][l] += row[l];
                }
            }
        }
        for (p, panel) in values.chunks_exact(len_kv * M).enumerate() {
            let panel = &panel[start * M..][..keys * M];
            let (probabilities, out) = (&scores[start..], &mut result[p * M..]);
            group_product::<M, T, FMA, WIDE>(
                panel,
                probabilities,
                padded_keys,
                out,
                padded_dv,
                tiles,
                true,
            );
        }
    }
    for (result, sums) in result.chunks_mut(padded_dv).zip(&sums) {
        let mut inverse = [0f32; TILE];
        for l in 0..TILE {
            inverse[l] = 1.0 / (sums[0][l] + sums[1][l]);
        }
        for row in result {
            for l in 0..TILE {
                row[l] *= inverse[l];
            }
        }
    }
}

vectorized! {
    /// One head for a group of tiles: the scores of each tile's `queries` (one channel per row,
    /// already scaled; tile after tile) against every key, their softmax down each lane, and the
    /// values they weight into `result` (tile after tile). Each panel of keys is read by every tile
    /// of the group while it is in the L1 cache.
    fn attend(
        queries: &[Lanes],
        keys: &[f32],
        values: &[f32],
        len_kv: usize,
        panels: Panels,
        scores: &mut [Lanes],
        result: &mut [Lanes],
    ) {
        let padded_keys = len_kv.next_multiple_of(panels.keys);
        let max = match (panels.keys, panels.tiles) {
            (6, 1) => score::<6, 1, FMA, WIDE>(queries, keys, len_kv, scores),
            (12, 2) => score::<12, 2, FMA, WIDE>(queries, keys, len_kv, scores),
            other => unreachable!("no key panels of {other:?} rows and tiles"),
        };
        // Direct calls, not a function pointer: each must be inlined into this build's features.
        let (v, k, s, m, r) = (values, len_kv, padded_keys, &max, result);
        match (panels.values, panels.tiles) {
            (5, 1) => weigh::<5, 1, FMA, WIDE>(v, k, s, scores, m, r),
            (6, 1) => weigh::<6, 1, FMA, WIDE>(v, k, s, scores, m, r),
            (8, 2) => weigh::<8, 2, FMA, WIDE>(v, k, s, scores, m, r),
            (10, 2) => weigh::<10, 2, FMA, WIDE>(v, k, s, scores, m, r),
            (12, 2) => weigh::<12, 2, FMA, WIDE>(v, k, s, scores, m, r),
            other => unreachable!("no value panels of {other:?} rows and tiles"),
        }
    }
}

/// The scores of each tile's `queries` against every key, in panels of `K` keys, `T` tiles at a
/// time, and each lane's largest score.
#[inline(always)]
fn score<const K: usize, const T: usize, const FMA: bool, const WIDE: bool>(
    queries: &[Lanes],
    keys: &[f32],
    len_kv: usize,
    scores: &mut [Lanes],
) -> [Lanes; MAX_GROUP] {
    let padded_keys = len_kv.next_multiple_of(K);
    let tiles = scores.len() / padded_keys;
    let d = queries.len() / tiles;
    let mut max = [Lanes([f32::NEG_INFINITY; TILE]); MAX_GROUP];
    for (p, panel) in keys.chunks_exact(d * K).enumerate() {
        let out = &mut scores[p * K..];
        group_product::<K, T, FMA, WIDE>(panel, queries, d, out, padded_keys, tiles, false);
        // The last panel's rows past the last key are padding, not scores.
        let real = K.min(len_kv - p * K);
        for (scores, max) in scores.chunks(padded_keys).zip(&mut max) {
            for row in &scores[p * K..][..real] {
                for l in 0..TILE {
                    max[l] = if row[l] > max[l] { row[l] } else { max[l] };
                }
            }
        }
    }
    max
}

/// 2ˣ for x ≤ 0 in plain arithmetic the compiler vectorises: 2ⁿ·2ʳ with n the nearest integer and
/// r in [−½, ½], 2ʳ by a degree-5 polynomial fitted to its relative error there (below 7.5e-8, and
/// 2.4e-7 with each step rounded to `f32`).
#[inline(always)]
pub(crate) fn exp2<const FMA: bool>(x: f32) -> f32 {
    // As in `exp`: adding 1.5·2²³ + 127 leaves n + 127 in the sum's low mantissa bits. For
    // x ≥ −126, n + 127 ≥ 1: a normal 2ⁿ.
    const ROUND: f32 = 12_582_912.0 + 127.0;
    const FIT: [f32; 6] = [
        1.000_000_1,
        0.693_146_94,
        0.240_221_2,
        0.055_507_13,
        0.009_675_541,
        0.001_327_647_2,
    ];
    let x = x.max(-126.0);
    let shifted = x + ROUND;
    let r = x - (shifted - ROUND);
    let mut p = FIT[5];
    for c in FIT[..5].iter().rev() {
        p = mul_add::<FMA>(p, r, *c);
    }
    f32::from_bits(shifted.to_bits() << 23) * p
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
        // Uneven sizes: partial tiles of queries, keys ≠ queries and not a whole number of
        // panels, value width ≠ key width; value panels of 6 channels (24) and of 5 (40, as in
        // Stable Diffusion 1.5); a thousand keys, whose softmax sums run long; keys too large for
        // one tile at a time (2.2 MB a head: groups of two tiles, the last group of one). Each
        // case in both panel layouts, whichever this CPU runs: value panels of 5, 6, 8, 10 and 12
        // channels, key panels of 6 and 12.
        let cases = [
            (2, 3, 300, 77, 16, 24),
            (1, 2, 37, 1000, 40, 40),
            (2, 1, 5, 3, 8, 36),
            (1, 2, 70, 900, 600, 30),
        ];
        for ((batch, heads, len_q, len_kv, d, dv), wide) in cases
            .into_iter()
            .flat_map(|case| [(case, false), (case, true)])
        {
            let device = Device::flex();
            let n = Distribution::Normal(0.0, 1.5);
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
            let actual = attention_in_panels(q, k, v, heads, Panels::new(wide, dv));
            assert_eq!(actual.dims(), [batch, len_q, heads * dv]);
            let actual: Vec<f32> = actual.into_data().try_to_vec::<f32>().unwrap();
            let error = actual
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // Both sides round each score's d products in a different order: the rounding
            // grows with √d (≈1.2e-5 is seen at d = 600), so the bound does too.
            let tolerance = 1e-5 * (d as f32 / 40.0).sqrt().max(1.0);
            assert!(
                error < tolerance,
                "{len_q} queries, {len_kv} keys, d {d}, dv {dv}, wide {wide}: max error {error}"
            );
        }
    }

    #[test]
    fn exponentials_are_accurate_where_softmax_uses_them() {
        // Both builds of each (separate products and sums, and fused multiply-adds) over the range
        // a softmax reaches, each within its relative bound: eˣ, and 2ˣ at whole and half powers
        // of two (where the fit's range ends) and between.
        type Exp = fn(f32) -> f32;
        let cases: [(Exp, Exp, f32, f32); 4] = [
            (exp::<false>, f32::exp, 0.0087, 1e-6),
            (exp::<true>, f32::exp, 0.0087, 1e-6),
            (exp2::<false>, f32::exp2, 0.006_25, 4e-7),
            (exp2::<true>, f32::exp2, 0.006_25, 4e-7),
        ];
        for (ours, reference, step, bound) in cases {
            for i in 0..20_000 {
                let x = -(i as f32) * step;
                let (got, want) = (ours(x), reference(x));
                assert!(
                    (got - want).abs() <= bound * want.max(1e-30),
                    "at {x}: {got}, not {want}"
                );
            }
            assert!(ours(-300.0) < 1e-37, "underflow clamps to a tiny value");
        }
    }
}
