//! Hearth's CPU matmul for Q4_1 weights.
//!
//! candle 0.11 has no SIMD kernel for Q4_1 (`BlockQ4_1::vec_dot` is scalar), which made SmolLM2's
//! Q4_1 GGUF decode at a fifth of llama.cpp's speed. This kernel follows ggml's arithmetic on x86:
//! activations are quantized per 32-wide block to Q8_1 (scale `d = max|x| / 127`, values rounded to
//! nearest-even, and the block's `d · Σq` kept for Q4_1's offset term, both stored through f16 as
//! ggml stores them), and each output is `Σ_blocks d_w·d_x·(q_w·q_x) + m_w·s_x`, with the integer
//! dot products in AVX2 (`maddubs`/`madd`) accumulated over eight FMA lanes. candle rounds the
//! offset term twice in f16 (`f16(Σq) · f16(d)`), which costs accuracy; this kernel does not.
//!
//! Each output element is computed the same way whatever the number of rows, so a sequence gets
//! bit-identical logits alone and in a batch. Rows of `x` are quantized once per call and every
//! weight block is read once per call for all rows, which is what makes batched decode cheap on a
//! memory-bound CPU. Columns are split across rayon's pool.
//!
//! Machines without AVX2+FMA run the same arithmetic in scalar code (also the tests' reference).

use half::f16;
use rayon::prelude::*;

use crate::error::BackendError;

const QK: usize = 32;
/// Bytes of one ggml `block_q4_1`: f16 scale, f16 minimum, 16 bytes of nibbles.
const BLOCK_BYTES: usize = 20;
/// Output columns one rayon task computes (for every row).
const COLUMNS_PER_TASK: usize = 32;

/// A Q4_1 weight matrix `[n, k]` (n outputs of k inputs), scales widened to f32 at load.
pub struct Q4_1Matrix {
    n: usize,
    k: usize,
    /// `(d, m)` per block, row-major: `n * k / 32` entries.
    scales: Vec<[f32; 2]>,
    /// Nibbles per block: element `j` in the low nibble of byte `j`, element `j + 16` in the high.
    nibbles: Vec<[u8; 16]>,
    simd: bool,
}

/// One 32-wide block of quantized activations.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct BlockQ8_1 {
    qs: [i8; QK],
    /// The block's scale, rounded through f16.
    d: f32,
    /// `d · Σ qs`, rounded through f16.
    s: f32,
}

impl Q4_1Matrix {
    /// Reads ggml `block_q4_1` data for a `[n, k]` matrix. `simd: false` forces the scalar path.
    pub fn from_ggml(bytes: &[u8], n: usize, k: usize, simd: bool) -> Result<Self, BackendError> {
        if !k.is_multiple_of(QK) || bytes.len() != n * k / QK * BLOCK_BYTES {
            return Err(BackendError::Unsupported(format!(
                "Q4_1 data of {} bytes does not hold a [{n}, {k}] matrix",
                bytes.len()
            )));
        }
        let blocks = bytes.chunks_exact(BLOCK_BYTES);
        let scales = blocks
            .clone()
            .map(|b| {
                let half = |i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
                [half(0), half(2)]
            })
            .collect();
        let nibbles = blocks.map(|b| b[4..].try_into().expect("16 bytes")).collect();
        Ok(Self { n, k, scales, nibbles, simd: simd && avx2_available() })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// `y = x Wᵀ` for `x` of `m` rows of `k` values; returns `m` rows of `n` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "input is not {m} rows of {}", self.k);
        let blocks = self.k / QK;
        let activations: Vec<BlockQ8_1> = x.chunks_exact(QK).map(quantize_block).collect();
        // Column-major result ([n, m]) so each task owns a contiguous slice; transposed at the end.
        let mut transposed = vec![0f32; self.n * m];
        transposed.par_chunks_mut(COLUMNS_PER_TASK * m).enumerate().for_each(|(task, out)| {
            let first = task * COLUMNS_PER_TASK;
            for (i, column) in out.chunks_exact_mut(m).enumerate() {
                let col = first + i;
                let scales = &self.scales[col * blocks..(col + 1) * blocks];
                let nibbles = &self.nibbles[col * blocks..(col + 1) * blocks];
                for (row, value) in column.iter_mut().enumerate() {
                    let a = &activations[row * blocks..(row + 1) * blocks];
                    *value = if self.simd {
                        // SAFETY: `simd` is set only when AVX2 and FMA are available.
                        unsafe { dot_avx2(scales, nibbles, a) }
                    } else {
                        dot_scalar(scales, nibbles, a)
                    };
                }
            }
        });
        let mut y = vec![0f32; m * self.n];
        for (col, column) in transposed.chunks_exact(m).enumerate() {
            for (row, &value) in column.iter().enumerate() {
                y[row * self.n + col] = value;
            }
        }
        y
    }
}

fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// ggml's x86 `quantize_row_q8_1` for one block.
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

fn dot_scalar(scales: &[[f32; 2]], nibbles: &[[u8; 16]], a: &[BlockQ8_1]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut offsets = 0f32;
    for ((&[d, m], q), y) in scales.iter().zip(nibbles).zip(a) {
        offsets += m * y.s;
        let scale = d * y.d;
        // The same eight partial sums as the AVX2 lanes: lane l holds elements 4l..4l+3 of the
        // 32 (low nibbles for lanes 0-3, high nibbles for lanes 4-7).
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
    // ggml's hsum_float_8: high half + low half, then pairwise.
    let four = [lanes[0] + lanes[4], lanes[1] + lanes[5], lanes[2] + lanes[6], lanes[3] + lanes[7]];
    let two = [four[0] + four[2], four[1] + four[3]];
    two[0] + two[1] + offsets
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(scales: &[[f32; 2]], nibbles: &[[u8; 16]], a: &[BlockQ8_1]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    let mut offsets = 0f32;
    let low_mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for ((&[d, m], q), y) in scales.iter().zip(nibbles).zip(a) {
        offsets += m * y.s;
        let scale = _mm256_set1_ps(d * y.d);
        let packed = _mm_loadu_si128(q.as_ptr() as *const __m128i);
        let weights = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low_mask);
        let activations = _mm256_load_si256(y.qs.as_ptr() as *const __m256i);
        // u8 × i8 pairs summed to i16 (no overflow: 15 · 127 · 2 < 2¹⁵), then pairs of those to i32.
        let pairs = _mm256_madd_epi16(_mm256_maddubs_epi16(weights, activations), ones);
        acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(pairs), acc);
    }
    let four = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
    let two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    let one = _mm_add_ss(two, _mm_movehdup_ps(two));
    _mm_cvtss_f32(one) + offsets
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2(scales: &[[f32; 2]], nibbles: &[[u8; 16]], a: &[BlockQ8_1]) -> f32 {
    dot_scalar(scales, nibbles, a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random Q4_1 matrix's bytes (scales within f16's range, random nibbles).
    fn random_matrix(n: usize, k: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut bytes = Vec::with_capacity(n * k / QK * BLOCK_BYTES);
        for _ in 0..n * k / QK {
            let d = f16::from_f32((next() % 1000) as f32 / 50_000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 10_000.0);
            bytes.extend_from_slice(&d.to_le_bytes());
            bytes.extend_from_slice(&m.to_le_bytes());
            bytes.extend((0..16).map(|_| next() as u8));
        }
        bytes
    }

    fn dequantize(bytes: &[u8], n: usize, k: usize) -> Vec<f64> {
        let mut w = Vec::with_capacity(n * k);
        for b in bytes.chunks_exact(BLOCK_BYTES) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f64();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f64();
            let low = b[4..].iter().map(|q| (q & 0x0F) as f64);
            let high = b[4..].iter().map(|q| (q >> 4) as f64);
            w.extend(low.chain(high).map(|q| d * q + m));
        }
        w
    }

    #[test]
    fn simd_and_scalar_agree_and_match_a_float64_matmul() {
        let (n, k, m) = (70, 256, 5);
        let bytes = random_matrix(n, k, 42);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5).collect();
        let simd = Q4_1Matrix::from_ggml(&bytes, n, k, true).unwrap().matmul(&x, m);
        let scalar = Q4_1Matrix::from_ggml(&bytes, n, k, false).unwrap().matmul(&x, m);
        let w = dequantize(&bytes, n, k);
        for row in 0..m {
            for col in 0..n {
                let exact: f64 = (0..k).map(|i| w[col * k + i] * x[row * k + i] as f64).sum();
                let (s, c) = (simd[row * n + col], scalar[row * n + col]);
                assert!((s - c).abs() <= 1e-5 * s.abs().max(1.0), "simd {s} vs scalar {c}");
                // Activation quantization: about 1/254 of each block's largest value per element.
                let bound: f64 = (0..k).map(|i| w[col * k + i].abs()).sum::<f64>() * 1.5 / 254.0 + 1e-3;
                assert!((s as f64 - exact).abs() <= bound, "[{row}, {col}]: {s} vs exact {exact}");
            }
        }
    }

    #[test]
    fn rows_are_computed_the_same_alone_and_together() {
        let (n, k) = (64, 128);
        let matrix = Q4_1Matrix::from_ggml(&random_matrix(n, k, 7), n, k, true).unwrap();
        let x: Vec<f32> = (0..3 * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let together = matrix.matmul(&x, 3);
        for row in 0..3 {
            assert_eq!(matrix.matmul(&x[row * k..(row + 1) * k], 1), &together[row * n..(row + 1) * n]);
        }
    }

    #[test]
    fn rounding_is_to_nearest_even_like_ggml() {
        let mut x = [0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -3.5;
        let block = quantize_block(&x);
        assert_eq!((block.qs[0], block.qs[1], block.qs[2]), (127, 2, -4));
    }

    #[test]
    fn a_wrong_size_is_refused() {
        assert!(Q4_1Matrix::from_ggml(&[0u8; 19], 1, 32, true).is_err());
        assert!(Q4_1Matrix::from_ggml(&[0u8; 20], 1, 16, true).is_err());
    }
}
