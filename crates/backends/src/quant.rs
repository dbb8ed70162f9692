//! Hearth's CPU matmuls for ggml block-quantized weights: Q4_1 and Q8_0.
//!
//! candle 0.11 has no SIMD kernel for Q4_1 (`BlockQ4_1::vec_dot` is scalar), which made SmolLM2's
//! Q4_1 GGUF decode at a fifth of llama.cpp's speed, and its Q8_0 kernel (SmolLM2's tied
//! embeddings, the largest single matrix) reads every weight block once per input row and runs on
//! candle's own thread pool, which fights rayon's for the same cores. These kernels follow ggml's
//! arithmetic on x86:
//!
//! - activations are quantized per 32-wide block to Q8_1 (scale `d = max|x| / 127`, values rounded
//!   to nearest-even, and the block's `d · Σq` kept for Q4_1's offset term, both stored through f16
//!   as ggml stores them; Q8_0 uses the same values without the sum);
//! - Q4_1: each output is `Σ_blocks d_w·d_x·(q_w·q_x) + m_w·s_x`; Q8_0: `Σ_blocks d_w·d_x·(q_w·q_x)`;
//!   the integer dot products accumulate over eight FMA lanes (lane `l` holds elements `4l..4l+3`
//!   of each block), summed as ggml's `hsum_float_8` does; the offset term is summed block by
//!   block, unfused, as ggml's `summs` is. candle rounds Q4_1's offset term twice in f16
//!   (`f16(Σq) · f16(d)`); this does not.
//!
//! Each output element is computed the same way whatever the number of rows, so a sequence gets
//! bit-identical logits alone and in a batch. Rows are taken in tiles of up to eight: a weight
//! block is loaded and unpacked once for the tile, the tile's activation scales are multiplied by
//! the weight's scale in one vector product (and Q4_1's offset terms added in another), and the
//! rows' accumulations are independent chains. That leaves three vector operations per block and
//! row where AVX-512 VNNI is there (`vpdpbusd` for the integer products, a convert, an FMA: what
//! makes batched decode and prefill cheap), four with AVX2 (`maddubs` + `madd`); the integer sums
//! are the same either way. Columns are split across rayon's pool.
//!
//! Machines without AVX2+FMA run the same arithmetic in scalar code (also the tests' reference).

use half::f16;
use rayon::prelude::*;

use crate::error::BackendError;

const QK: usize = 32;
/// Output columns one rayon task computes (for every row).
const COLUMNS_PER_TASK: usize = 32;
/// The most rows computed together against each weight block.
const MAX_TILE: usize = 8;
/// How many columns ahead the kernels prefetch weights (measured on SmolLM2: one column ahead
/// left a tile of eight rows waiting on L3 for 12% of its time; four, 1.2× faster per step than none
/// with one row, 1.45× with eight).
const PREFETCH_COLUMNS: usize = 4;

/// The ggml block formats with a Hearth kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// `block_q4_1`: f16 scale, f16 minimum, 32 four-bit values (20 bytes).
    Q4_1,
    /// `block_q8_0`: f16 scale, 32 signed bytes (34 bytes).
    Q8_0,
}

impl QuantFormat {
    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Which code computes the products: all three give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    /// AVX2 + FMA: `maddubs` and `madd` for the integer products.
    Avx2,
    /// AVX2 + FMA with AVX-512 VNNI on 256-bit registers: `vpdpbusd` for them.
    Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                if is_x86_feature_detected!("avx512vl") && is_x86_feature_detected!("avx512vnni") {
                    return Self::Vnni;
                }
                return Self::Avx2;
            }
        }
        Self::Scalar
    }

    /// The kernels this CPU runs, slowest first (the tests compare them).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Self> {
        let all = [Self::Scalar, Self::Avx2, Self::Vnni];
        let best = all.iter().position(|&k| k == Self::best()).unwrap_or(0);
        all[..=best].to_vec()
    }
}

enum Blocks {
    /// `(d, m)` per block, and nibbles: element `j` in the low nibble of byte `j`, element `j + 16`
    /// in the high one.
    Q4_1 {
        scales: Vec<[f32; 2]>,
        nibbles: Vec<[u8; 16]>,
    },
    Q8_0 {
        scales: Vec<f32>,
        quants: Vec<[i8; QK]>,
    },
}

/// A quantized weight matrix `[n, k]` (n outputs of k inputs), block scales widened to f32 at load.
pub struct QuantMatrix {
    n: usize,
    k: usize,
    blocks: Blocks,
    kernel: Kernel,
}

/// One 32-wide block of quantized activations.
#[derive(Clone, Copy)]
#[repr(C)]
struct BlockQ8_1 {
    qs: [i8; QK],
    /// The block's scale, rounded through f16.
    d: f32,
    /// `d · Σ qs`, rounded through f16.
    s: f32,
}

/// Rows of activations quantized for the kernels, in tiles.
struct Activations {
    /// Blocks per row.
    blocks: usize,
    /// `[row][block]`.
    rows: Vec<BlockQ8_1>,
    /// VNNI's Q8_0 kernel: per row and block, `-128 · Σ` of each lane's four values (it multiplies
    /// weights offset by 128 to make them unsigned, and starts each block's sums from this).
    offsets: Vec<[i32; 8]>,
    tiles: Vec<Tile>,
}

/// Where a task writes its columns of one product (rows are `n` apart).
struct Target(*mut f32);
// SAFETY: tasks write disjoint elements of the buffer behind the pointer (see `matmul_many`).
unsafe impl Sync for Target {}

/// Up to eight consecutive rows, with their scales and offset terms side by side per block.
struct Tile {
    first: usize,
    rows: usize,
    /// `[block][row]`: each row's `d`, padded with zeros to eight.
    d: Vec<[f32; 8]>,
    /// `[block][row]`: each row's `s`.
    s: Vec<[f32; 8]>,
}

impl Activations {
    fn new(x: &[f32], m: usize, k: usize, kernel: Kernel) -> Self {
        let blocks = k / QK;
        let rows = quantize(x, kernel != Kernel::Scalar);
        let offsets = if kernel == Kernel::Vnni {
            rows.iter()
                .map(|b| {
                    std::array::from_fn(|l| {
                        -128 * b.qs[4 * l..4 * l + 4].iter().map(|&q| q as i32).sum::<i32>()
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut tiles = Vec::new();
        let mut first = 0;
        while first < m {
            let size = match m - first {
                r if r >= MAX_TILE => MAX_TILE,
                r if r >= 4 => 4,
                r => r,
            };
            let column = |b: usize, f: fn(&BlockQ8_1) -> f32| {
                std::array::from_fn(|r| if r < size { f(&rows[(first + r) * blocks + b]) } else { 0.0 })
            };
            tiles.push(Tile {
                first,
                rows: size,
                d: (0..blocks).map(|b| column(b, |y| y.d)).collect(),
                s: (0..blocks).map(|b| column(b, |y| y.s)).collect(),
            });
            first += size;
        }
        Self { blocks, rows, offsets, tiles }
    }

    fn row(&self, row: usize) -> &[BlockQ8_1] {
        &self.rows[row * self.blocks..(row + 1) * self.blocks]
    }

    fn row_offsets(&self, row: usize) -> &[[i32; 8]] {
        &self.offsets[row * self.blocks..(row + 1) * self.blocks]
    }
}

impl QuantMatrix {
    /// Reads ggml block data for a `[n, k]` matrix. `simd: false` forces the scalar path.
    pub fn from_ggml(
        format: QuantFormat,
        bytes: &[u8],
        n: usize,
        k: usize,
        simd: bool,
    ) -> Result<Self, BackendError> {
        let size = format.block_bytes();
        if !k.is_multiple_of(QK) || bytes.len() != n * k / QK * size {
            return Err(BackendError::Unsupported(format!(
                "{format:?} data of {} bytes does not hold a [{n}, {k}] matrix",
                bytes.len()
            )));
        }
        let half = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let chunks = bytes.chunks_exact(size);
        let blocks = match format {
            QuantFormat::Q4_1 => Blocks::Q4_1 {
                scales: chunks.clone().map(|b| [half(b, 0), half(b, 2)]).collect(),
                nibbles: chunks.map(|b| b[4..].try_into().expect("16 bytes")).collect(),
            },
            QuantFormat::Q8_0 => Blocks::Q8_0 {
                scales: chunks.clone().map(|b| half(b, 0)).collect(),
                quants: chunks.map(|b| std::array::from_fn(|i| b[2 + i] as i8)).collect(),
            },
        };
        Ok(Self { n, k, blocks, kernel: if simd { Kernel::best() } else { Kernel::Scalar } })
    }

    /// Quantizes a row-major f32 `[n, k]` matrix to Q8_0 as ggml's `quantize_row_q8_0_ref` does:
    /// per 32-wide block `d = max|x| / 127`, `q = round(x / d)` (halves away from zero), `d`
    /// stored through f16. For weights that come as floats (Whisper's decoder on the CPU).
    pub fn q8_0_from_f32(weights: &[f32], n: usize, k: usize, simd: bool) -> Result<Self, BackendError> {
        if !k.is_multiple_of(QK) || weights.len() != n * k {
            return Err(BackendError::Unsupported(format!(
                "{} values do not make a [{n}, {k}] matrix of 32-wide blocks",
                weights.len()
            )));
        }
        let (scales, quants) = weights
            .chunks_exact(QK)
            .map(|block| {
                let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let d = amax / 127.0;
                let inverse = if d == 0.0 { 0.0 } else { 1.0 / d };
                let q: [i8; QK] = std::array::from_fn(|i| (block[i] * inverse).round() as i8);
                (f16::from_f32(d).to_f32(), q)
            })
            .unzip();
        let kernel = if simd { Kernel::best() } else { Kernel::Scalar };
        Ok(Self { n, k, blocks: Blocks::Q8_0 { scales, quants }, kernel })
    }

    /// A matrix of no rows (a placeholder while one is being replaced).
    pub fn empty() -> Self {
        Self {
            n: 0,
            k: 0,
            blocks: Blocks::Q8_0 { scales: Vec::new(), quants: Vec::new() },
            kernel: Kernel::Scalar,
        }
    }

    /// The same matrix computed by `kernel` (tests).
    #[cfg(test)]
    pub(crate) fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = kernel;
        self
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `row` of the matrix in f32 (an embedding lookup), as ggml's `dequantize_row` computes it.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let blocks = self.k / QK;
        let range = row * blocks..(row + 1) * blocks;
        match &self.blocks {
            Blocks::Q4_1 { scales, nibbles } => {
                for ((&[d, m], q), out) in
                    scales[range.clone()].iter().zip(&nibbles[range]).zip(out.chunks_exact_mut(QK))
                {
                    for j in 0..16 {
                        out[j] = (q[j] & 0x0F) as f32 * d + m;
                        out[j + 16] = (q[j] >> 4) as f32 * d + m;
                    }
                }
            }
            Blocks::Q8_0 { scales, quants } => {
                for ((&d, q), out) in
                    scales[range.clone()].iter().zip(&quants[range]).zip(out.chunks_exact_mut(QK))
                {
                    for (o, &v) in out.iter_mut().zip(q) {
                        *o = v as f32 * d;
                    }
                }
            }
        }
    }

    /// `y = x Wᵀ` for `x` of `m` rows of `k` values; returns `m` rows of `n` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        Self::matmul_many(&[self], x, m).pop().expect("one product")
    }

    /// `x Wᵀ` for several matrices of the same width at once (a layer's Q, K and V; its gate and
    /// up projections): the activations are quantized once and every matrix's columns share one
    /// parallel pass. Each product is the one [`QuantMatrix::matmul`] gives.
    pub fn matmul_many(matrices: &[&QuantMatrix], x: &[f32], m: usize) -> Vec<Vec<f32>> {
        let Some(first) = matrices.first() else { return Vec::new() };
        let k = first.k;
        assert!(matrices.iter().all(|w| w.k == k), "matrices of different widths");
        assert_eq!(x.len(), m * k, "input is not {m} rows of {k}");
        // The activations are quantized for the strongest kernel among the matrices (the scalar
        // and SIMD quantizers give the same blocks; only VNNI needs its offsets too).
        let kernel = matrices.iter().map(|w| w.kernel).max_by_key(|k| *k as u8).unwrap_or(Kernel::Scalar);
        let activations = Activations::new(x, m, k, kernel);
        let mut outputs: Vec<Vec<f32>> = matrices.iter().map(|w| vec![0f32; m * w.n]).collect();
        // A task computes COLUMNS_PER_TASK columns of one matrix for every row.
        let tasks: Vec<(usize, usize)> = matrices
            .iter()
            .enumerate()
            .flat_map(|(i, w)| (0..w.n).step_by(COLUMNS_PER_TASK).map(move |first| (i, first)))
            .collect();
        let targets: Vec<Target> = outputs.iter_mut().map(|y| Target(y.as_mut_ptr())).collect();
        tasks.into_par_iter().for_each(|(i, first)| {
            let w = matrices[i];
            let columns = COLUMNS_PER_TASK.min(w.n - first);
            for tile in &activations.tiles {
                for c in 0..columns {
                    let col = first + c;
                    let mut values = [0f32; MAX_TILE];
                    let values = &mut values[..tile.rows];
                    match tile.rows {
                        8 => values.copy_from_slice(&w.dot::<8>(col, &activations, tile)),
                        4 => values.copy_from_slice(&w.dot::<4>(col, &activations, tile)),
                        3 => values.copy_from_slice(&w.dot::<3>(col, &activations, tile)),
                        2 => values.copy_from_slice(&w.dot::<2>(col, &activations, tile)),
                        _ => values.copy_from_slice(&w.dot::<1>(col, &activations, tile)),
                    }
                    for (r, &value) in values.iter().enumerate() {
                        // SAFETY: the element is inside output `i` (`tile.first + r < m`, `col <
                        // w.n`), which lives until the tasks end, and no other task writes it:
                        // each (matrix, column) belongs to one task.
                        unsafe { *targets[i].0.add((tile.first + r) * w.n + col) = value };
                    }
                }
            }
        });
        outputs
    }

    /// Output column `col` for the `R` rows of `tile`.
    fn dot<const R: usize>(&self, col: usize, activations: &Activations, tile: &Tile) -> [f32; R] {
        debug_assert_eq!(tile.rows, R);
        let blocks = self.k / QK;
        let range = col * blocks..(col + 1) * blocks;
        let a: [&[BlockQ8_1]; R] = std::array::from_fn(|r| activations.row(tile.first + r));
        match &self.blocks {
            Blocks::Q4_1 { scales, nibbles } => {
                let (scales, nibbles) = (&scales[range.clone()], &nibbles[range]);
                match self.kernel {
                    // SAFETY: the kernel is chosen only where its instructions are available.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { q4_1_avx2(scales, nibbles, a, tile) },
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => unsafe { q4_1_vnni(scales, nibbles, a, tile) },
                    _ => a.map(|a| q4_1_scalar(scales, nibbles, a)),
                }
            }
            Blocks::Q8_0 { scales, quants } => {
                let (scales, quants) = (&scales[range.clone()], &quants[range]);
                match self.kernel {
                    // SAFETY: as above.
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Avx2 => unsafe { q8_0_avx2(scales, quants, a, tile) },
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Vnni => {
                        let offsets = std::array::from_fn(|r| activations.row_offsets(tile.first + r));
                        // SAFETY: as above.
                        unsafe { q8_0_vnni(scales, quants, a, offsets, tile) }
                    }
                    _ => a.map(|a| q8_0_scalar(scales, quants, a)),
                }
            }
        }
    }
}

/// Quantizes rows of activations block by block (parallel when there are many).
fn quantize(x: &[f32], simd: bool) -> Vec<BlockQ8_1> {
    let block = |x: &[f32]| {
        if simd {
            // SAFETY: `simd` is set only when AVX2 and FMA are available.
            unsafe { quantize_block_avx2(x) }
        } else {
            quantize_block(x)
        }
    };
    if x.len() >= 64 * 1024 {
        x.par_chunks_exact(QK).map(block).collect()
    } else {
        x.chunks_exact(QK).map(block).collect()
    }
}

/// ggml's `quantize_row_q8_1` for one block.
fn quantize_block(x: &[f32]) -> BlockQ8_1 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    BlockQ8_1 { qs, d: f16::from_f32(d).to_f32(), s: f16::from_f32(d * sum as f32).to_f32() }
}

/// [`quantize_block`] in AVX2: the same values (max, one division, products rounded to nearest-even).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(x: &[f32]) -> BlockQ8_1 {
    use std::arch::x86_64::*;
    debug_assert_eq!(x.len(), QK);
    let p = x.as_ptr();
    let v = [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ];
    let sign = _mm256_set1_ps(-0.0);
    let mut max = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        max = _mm256_max_ps(max, _mm256_andnot_ps(sign, *vi));
    }
    let mut max4 = _mm_max_ps(_mm256_extractf128_ps(max, 1), _mm256_castps256_ps128(max));
    max4 = _mm_max_ps(max4, _mm_movehl_ps(max4, max4));
    max4 = _mm_max_ss(max4, _mm_movehdup_ps(max4));
    let amax = _mm_cvtss_f32(max4);
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let ints = v.map(|vi| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(vi, id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let total = _mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3]));
    let mut lanes = [0i32; 8];
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, total);
    let sum: i32 = lanes.iter().sum();
    // Pack i32 → i16 → i8 (values are within ±127, so no saturation), then undo the lane interleave.
    let packed =
        _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
    let ordered = _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let mut qs = [0i8; QK];
    _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, ordered);
    BlockQ8_1 { qs, d: f16::from_f32(d).to_f32(), s: f16::from_f32(d * sum as f32).to_f32() }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_block_avx2(x: &[f32]) -> BlockQ8_1 {
    quantize_block(x)
}

/// ggml's `hsum_float_8` order for eight lanes: high half + low half, then pairwise.
pub(crate) fn hsum_lanes(lanes: [f32; 8]) -> f32 {
    let four = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    let two = [four[0] + four[2], four[1] + four[3]];
    two[0] + two[1]
}

fn q4_1_scalar(scales: &[[f32; 2]], nibbles: &[[u8; 16]], a: &[BlockQ8_1]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut offsets = 0f32;
    for ((&[d, m], q), y) in scales.iter().zip(nibbles).zip(a) {
        offsets += m * y.s;
        let scale = d * y.d;
        for (lane, sum) in lanes.iter_mut().enumerate() {
            let mut dot = 0i32;
            for j in 0..4 {
                let e = lane * 4 + j;
                let w = if e < 16 { q[e] & 0x0F } else { q[e - 16] >> 4 };
                dot += w as i32 * y.qs[e] as i32;
            }
            *sum = scale.mul_add(dot as f32, *sum);
        }
    }
    hsum_lanes(lanes) + offsets
}

fn q8_0_scalar(scales: &[f32], quants: &[[i8; QK]], a: &[BlockQ8_1]) -> f32 {
    let mut lanes = [0f32; 8];
    for ((&d, q), y) in scales.iter().zip(quants).zip(a) {
        let scale = d * y.d;
        for (lane, sum) in lanes.iter_mut().enumerate() {
            let dot: i32 = (lane * 4..lane * 4 + 4).map(|e| q[e] as i32 * y.qs[e] as i32).sum();
            *sum = scale.mul_add(dot as f32, *sum);
        }
    }
    hsum_lanes(lanes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum_avx2(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let four = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_movehdup_ps(two));
    _mm_cvtss_f32(one)
}

/// The SIMD kernels' shared loop, for `R` rows of a tile: per weight block, the rows' combined
/// scales `d_w · d_x` in one vector product (stored, then broadcast to each row), Q4_1's offset
/// terms `m_w · s_x` for all rows in one more (lane `r` adds row `r`'s, in block order), and per
/// row the block's integer products from `int_dot` (eight i32 lanes), converted and FMA'd into the
/// row's lanes. `int_dot(w, block, row)` receives the prepared weights `w = weights(block)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn tile_loop<const R: usize, const OFFSETS: bool, W: Copy>(
    blocks: usize,
    tile: &Tile,
    weight_scale: impl Fn(usize) -> f32,
    weight_min: impl Fn(usize) -> f32,
    weights: impl Fn(usize) -> W,
    int_dot: impl Fn(W, usize, usize) -> std::arch::x86_64::__m256i,
    prefetch: impl Fn(usize),
) -> [f32; R] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut offsets = _mm256_setzero_ps();
    let mut scale = [0f32; 8];
    for b in 0..blocks {
        prefetch(b);
        let w = weights(b);
        let combined = _mm256_mul_ps(_mm256_set1_ps(weight_scale(b)), _mm256_loadu_ps(tile.d[b].as_ptr()));
        _mm256_storeu_ps(scale.as_mut_ptr(), combined);
        if OFFSETS {
            let terms = _mm256_mul_ps(_mm256_set1_ps(weight_min(b)), _mm256_loadu_ps(tile.s[b].as_ptr()));
            offsets = _mm256_add_ps(offsets, terms);
        }
        for r in 0..R {
            let products = _mm256_cvtepi32_ps(int_dot(w, b, r));
            acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(&scale[r]), products, acc[r]);
        }
    }
    if !OFFSETS {
        return std::array::from_fn(|r| hsum_avx2(acc[r]));
    }
    let mut offset = [0f32; 8];
    _mm256_storeu_ps(offset.as_mut_ptr(), offsets);
    std::array::from_fn(|r| hsum_avx2(acc[r]) + offset[r])
}

/// Asks for block `b` of the next column's scales and values (they follow this column's in memory)
/// to be brought into the cache while this column is computed: the weights stream from memory or
/// L3 once per step, and without this a tile of rows waits on them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_next_column<S, V>(scales: &[S], values: &[V], b: usize) {
    use std::arch::x86_64::*;
    let ahead = PREFETCH_COLUMNS * scales.len() + b;
    // Prefetches never fault; the addresses past the matrix's end are only hints.
    _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add(ahead) as *const i8);
    _mm_prefetch::<_MM_HINT_T0>(scales.as_ptr().wrapping_add(ahead) as *const i8);
}

/// A Q4_1 block's 32 weights as unsigned bytes in element order (low nibbles, then high).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn unpack_q4_1(nibbles: &[u8; 16]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let packed = _mm_loadu_si128(nibbles.as_ptr() as *const __m128i);
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F))
}

/// Q4_1's tile loop; `VNNI` picks the integer products' instructions (the same sums either way).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4_1_tile<const R: usize, const VNNI: bool>(
    scales: &[[f32; 2]],
    nibbles: &[[u8; 16]],
    a: [&[BlockQ8_1]; R],
    tile: &Tile,
) -> [f32; R] {
    use std::arch::x86_64::*;
    tile_loop::<R, true, _>(
        scales.len(),
        tile,
        |b| scales.get_unchecked(b)[0],
        |b| scales.get_unchecked(b)[1],
        |b| unpack_q4_1(nibbles.get_unchecked(b)),
        |w, b, r| {
            let activations = _mm256_loadu_si256(a[r].get_unchecked(b).qs.as_ptr() as *const __m256i);
            if VNNI {
                // u8 × i8 in groups of four summed to i32.
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, activations)
            } else {
                // u8 × i8 pairs summed to i16 (no overflow: 15 · 127 · 2 < 2¹⁵), then pairs to i32.
                _mm256_madd_epi16(_mm256_maddubs_epi16(w, activations), _mm256_set1_epi16(1))
            }
        },
        |b| prefetch_next_column(scales, nibbles, b),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q4_1_avx2<const R: usize>(
    scales: &[[f32; 2]],
    nibbles: &[[u8; 16]],
    a: [&[BlockQ8_1]; R],
    tile: &Tile,
) -> [f32; R] {
    q4_1_tile::<R, false>(scales, nibbles, a, tile)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
unsafe fn q4_1_vnni<const R: usize>(
    scales: &[[f32; 2]],
    nibbles: &[[u8; 16]],
    a: [&[BlockQ8_1]; R],
    tile: &Tile,
) -> [f32; R] {
    q4_1_tile::<R, true>(scales, nibbles, a, tile)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn q8_0_avx2<const R: usize>(
    scales: &[f32],
    quants: &[[i8; QK]],
    a: [&[BlockQ8_1]; R],
    tile: &Tile,
) -> [f32; R] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    tile_loop::<R, false, _>(
        scales.len(),
        tile,
        |b| *scales.get_unchecked(b),
        |_| 0.0,
        |b| {
            let weights = _mm256_loadu_si256(quants.get_unchecked(b).as_ptr() as *const __m256i);
            // maddubs takes one unsigned operand: |w| × (y with w's sign), as ggml does.
            (weights, _mm256_sign_epi8(weights, weights))
        },
        |(weights, magnitudes), b, r| {
            let activations = _mm256_loadu_si256(a[r].get_unchecked(b).qs.as_ptr() as *const __m256i);
            let signed = _mm256_sign_epi8(activations, weights);
            _mm256_madd_epi16(_mm256_maddubs_epi16(magnitudes, signed), ones)
        },
        |b| prefetch_next_column(scales, quants, b),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vl,avx512vnni")]
unsafe fn q8_0_vnni<const R: usize>(
    scales: &[f32],
    quants: &[[i8; QK]],
    a: [&[BlockQ8_1]; R],
    offsets: [&[[i32; 8]]; R],
    tile: &Tile,
) -> [f32; R] {
    use std::arch::x86_64::*;
    tile_loop::<R, false, _>(
        scales.len(),
        tile,
        |b| *scales.get_unchecked(b),
        |_| 0.0,
        // w + 128 as unsigned bytes (flipping the sign bit).
        |b| {
            let weights = _mm256_loadu_si256(quants.get_unchecked(b).as_ptr() as *const __m256i);
            _mm256_xor_si256(weights, _mm256_set1_epi8(-128))
        },
        |w, b, r| {
            let activations = _mm256_loadu_si256(a[r].get_unchecked(b).qs.as_ptr() as *const __m256i);
            // Σ (w + 128)·y, started from -128·Σ y: exactly Σ w·y per lane.
            let start = _mm256_loadu_si256(offsets[r].get_unchecked(b).as_ptr() as *const __m256i);
            _mm256_dpbusd_epi32(start, w, activations)
        },
        |b| prefetch_next_column(scales, quants, b),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// A random matrix's ggml bytes (scales within f16's range, random quants).
    fn random_matrix(format: QuantFormat, n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut next = xorshift(seed);
        let mut bytes = Vec::with_capacity(n * k / QK * format.block_bytes());
        for _ in 0..n * k / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 50_000.0);
            bytes.extend_from_slice(&d.to_le_bytes());
            match format {
                QuantFormat::Q4_1 => {
                    let m = f16::from_f32(-((next() % 1000) as f32) / 10_000.0);
                    bytes.extend_from_slice(&m.to_le_bytes());
                    bytes.extend((0..16).map(|_| next() as u8));
                }
                // ggml's quantizer writes -127..=127.
                QuantFormat::Q8_0 => bytes.extend((0..QK).map(|_| ((next() % 255) as i32 - 127) as i8 as u8)),
            }
        }
        bytes
    }

    /// The matrix in float64, dequantized independently of the kernel's code.
    fn dequantize(format: QuantFormat, bytes: &[u8]) -> Vec<f64> {
        let mut w = Vec::new();
        for b in bytes.chunks_exact(format.block_bytes()) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f64();
            match format {
                QuantFormat::Q4_1 => {
                    let m = f16::from_le_bytes([b[2], b[3]]).to_f64();
                    let low = b[4..].iter().map(|q| (q & 0x0F) as f64);
                    let high = b[4..].iter().map(|q| (q >> 4) as f64);
                    w.extend(low.chain(high).map(|q| d * q + m));
                }
                QuantFormat::Q8_0 => w.extend(b[2..].iter().map(|&q| d * (q as i8) as f64)),
            }
        }
        w
    }

    const FORMATS: [QuantFormat; 2] = [QuantFormat::Q4_1, QuantFormat::Q8_0];

    #[test]
    fn every_kernel_agrees_with_the_scalar_one_and_matches_a_float64_matmul() {
        let kernels = Kernel::available();
        println!("kernels on this CPU: {kernels:?}");
        for format in FORMATS {
            // 70 columns: two full tasks and a partial one; 15 rows: tiles of eight, four and three.
            let (n, k, m) = (70, 256, 15);
            let bytes = random_matrix(format, n, k, 42);
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5).collect();
            let matrix =
                |kernel| QuantMatrix::from_ggml(format, &bytes, n, k, true).unwrap().with_kernel(kernel);
            let scalar = matrix(Kernel::Scalar).matmul(&x, m);
            let w = dequantize(format, &bytes);
            for &kernel in &kernels {
                let y = matrix(kernel).matmul(&x, m);
                for row in 0..m {
                    for col in 0..n {
                        let (s, c) = (y[row * n + col], scalar[row * n + col]);
                        assert_eq!(
                            s.to_bits(),
                            c.to_bits(),
                            "{format:?} {kernel:?} [{row}, {col}]: {s} vs scalar {c}"
                        );
                    }
                }
            }
            for row in 0..m {
                for col in 0..n {
                    let exact: f64 = (0..k).map(|i| w[col * k + i] * x[row * k + i] as f64).sum();
                    let s = scalar[row * n + col];
                    // Activation quantization: about 1/254 of each block's largest value per element.
                    let bound: f64 = (0..k).map(|i| w[col * k + i].abs()).sum::<f64>() * 1.5 / 254.0 + 1e-3;
                    assert!(
                        (s as f64 - exact).abs() <= bound,
                        "{format:?} [{row}, {col}]: {s} vs exact {exact}"
                    );
                }
            }
        }
    }

    #[test]
    fn rows_are_computed_the_same_alone_and_together() {
        for format in FORMATS {
            for kernel in Kernel::available() {
                let (n, k, m) = (64, 128, 13);
                let matrix = QuantMatrix::from_ggml(format, &random_matrix(format, n, k, 7), n, k, true)
                    .unwrap()
                    .with_kernel(kernel);
                let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
                let together = matrix.matmul(&x, m);
                for row in 0..m {
                    let alone = matrix.matmul(&x[row * k..(row + 1) * k], 1);
                    assert_eq!(alone, &together[row * n..(row + 1) * n], "{format:?} {kernel:?} row {row}");
                }
                // Every tile size: each prefix of the rows gives its rows' values.
                for rows in 1..m {
                    assert_eq!(
                        matrix.matmul(&x[..rows * k], rows),
                        &together[..rows * n],
                        "{format:?} {rows} rows"
                    );
                }
            }
        }
    }

    #[test]
    fn several_matrices_at_once_give_each_ones_product() {
        let (k, m) = (96, 6);
        let q4 = QuantMatrix::from_ggml(
            QuantFormat::Q4_1,
            &random_matrix(QuantFormat::Q4_1, 40, k, 5),
            40,
            k,
            true,
        )
        .unwrap();
        let q8 = QuantMatrix::from_ggml(
            QuantFormat::Q8_0,
            &random_matrix(QuantFormat::Q8_0, 33, k, 6),
            33,
            k,
            true,
        )
        .unwrap();
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let both = QuantMatrix::matmul_many(&[&q4, &q8, &q4], &x, m);
        assert_eq!(both, vec![q4.matmul(&x, m), q8.matmul(&x, m), q4.matmul(&x, m)]);
        assert!(QuantMatrix::matmul_many(&[], &x, m).is_empty());
    }

    /// ggml's `quantize_row_q8_0_ref` on a hand-worked block: d = 127/127 = 1, q = round(x / d)
    /// with halves away from zero; and every value of a random matrix within d/2 of its input, plus
    /// the scale's f16 rounding (at most 127 · d · 2⁻¹¹).
    #[test]
    fn floats_quantize_to_q8_0_as_ggml_does() {
        let mut block = [0f32; QK];
        block[0] = -127.0;
        block[1] = 2.5;
        block[2] = -3.5;
        block[3] = 0.49;
        let matrix = QuantMatrix::q8_0_from_f32(&block, 1, QK, true).unwrap();
        let mut row = [0f32; QK];
        matrix.dequantize_row(0, &mut row);
        assert_eq!(&row[..5], &[-127.0, 3.0, -4.0, 0.0, 0.0]);

        let (n, k) = (6, 64);
        let weights: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.2).collect();
        let matrix = QuantMatrix::q8_0_from_f32(&weights, n, k, true).unwrap();
        let mut row = vec![0f32; k];
        for r in 0..n {
            matrix.dequantize_row(r, &mut row);
            for (b, (values, inputs)) in row.chunks(QK).zip(weights[r * k..][..k].chunks(QK)).enumerate() {
                let d = inputs.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                for (v, x) in values.iter().zip(inputs) {
                    assert!((v - x).abs() <= d * (0.5 + 127.0 / 2048.0), "row {r} block {b}: {v} vs {x}");
                }
            }
        }
        assert!(QuantMatrix::q8_0_from_f32(&weights, n, 60, true).is_err());
    }

    #[test]
    fn dequantized_rows_match_the_float64_matrix() {
        for format in FORMATS {
            let (n, k) = (5, 96);
            let bytes = random_matrix(format, n, k, 3);
            let matrix = QuantMatrix::from_ggml(format, &bytes, n, k, true).unwrap();
            let w = dequantize(format, &bytes);
            let mut row = vec![0f32; k];
            matrix.dequantize_row(3, &mut row);
            for (i, &v) in row.iter().enumerate() {
                assert!((v as f64 - w[3 * k + i]).abs() < 1e-6, "{format:?} {i}: {v} vs {}", w[3 * k + i]);
            }
        }
    }

    #[test]
    fn activation_quantization_rounds_to_nearest_even_like_ggml_and_simd_agrees() {
        let mut x = [0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        let block = quantize_block(&x);
        assert_eq!((block.qs[0], block.qs[1], block.qs[2]), (127, 2, -4));
        let mut next = xorshift(11);
        for _ in 0..200 {
            let x: Vec<f32> = (0..QK).map(|_| (next() % 20_001) as f32 / 1000.0 - 10.0).collect();
            let (a, b) = (quantize_block(&x), quantize(&x, true)[0]);
            assert_eq!((a.qs, a.d.to_bits(), a.s.to_bits()), (b.qs, b.d.to_bits(), b.s.to_bits()));
        }
        assert_eq!(quantize(&[0f32; QK], true)[0].qs, [0; QK]);
    }

    #[test]
    fn a_wrong_size_is_refused() {
        assert!(QuantMatrix::from_ggml(QuantFormat::Q4_1, &[0u8; 19], 1, 32, true).is_err());
        assert!(QuantMatrix::from_ggml(QuantFormat::Q4_1, &[0u8; 20], 1, 16, true).is_err());
        assert!(QuantMatrix::from_ggml(QuantFormat::Q8_0, &[0u8; 20], 1, 32, true).is_err());
    }
}
