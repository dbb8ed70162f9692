//! Int8 matrix products for many-row inputs on CPUs with AVX-512 VNNI (Whisper's encoder: 1500
//! rows a window, bound by arithmetic, where f32 GEMM is half of the time).
//!
//! The arithmetic is CTranslate2's int8 mode: weights quantized once per output row (symmetric,
//! `s_w = max|w| / 127`), activations per input row on the fly (`s_x = max|x| / 127`, rounded to
//! nearest-even), integer products summed exactly in i32, one scale at the end:
//! `y = s_x · s_w · Σ q_x q_w`. `vpdpbusd` multiplies unsigned by signed bytes, so the activations
//! are shifted by 128 into `u8` and `128 · Σ q_w` (kept per weight row) is subtracted again.
//!
//! Layout: the weights are packed in panels of 16 output rows, 4 inputs deep (`[n/16][k/4][16][4]`
//! bytes), so one 64-byte load feeds one `vpdpbusd` for 16 outputs; a tile of 4 input rows × 64
//! outputs keeps 16 accumulators in registers and is scaled and stored from there. Rows are split
//! across rayon's pool 32 at a time (each task quantizes its own rows and writes its own outputs).
//! Each output is computed the same way whatever the number of rows or the tile it falls in.

use rayon::prelude::*;

use crate::error::BackendError;

/// Outputs per panel (one zmm of i32) and panels per tile.
const PANEL: usize = 16;
const TILE_PANELS: usize = 4;
const TILE_COLUMNS: usize = PANEL * TILE_PANELS;
/// Input rows per tile, and per rayon task.
const TILE_ROWS: usize = 4;
const ROWS_PER_TASK: usize = 32;

/// Whether this CPU has the instructions [`Int8Matrix`] needs (AVX-512 F/BW and VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix `[n, k]` in int8 per output row, packed for the VNNI kernel.
pub struct Int8Matrix {
    n: usize,
    k: usize,
    /// `k` rounded up to a multiple of 4 (padding weights are zero).
    k4: usize,
    /// Panels of the `n` outputs rounded up to a whole tile (padding rows are zero).
    packed: Vec<i8>,
    scales: Vec<f32>,
    /// `128 · Σ_k q_w` per output row.
    offsets: Vec<i32>,
}

impl Int8Matrix {
    /// Quantizes a row-major f32 `[n, k]` matrix; `None` where the CPU lacks VNNI.
    pub fn from_f32(weights: &[f32], n: usize, k: usize) -> Result<Option<Self>, BackendError> {
        if weights.len() != n * k || k == 0 {
            return Err(BackendError::Unsupported(format!(
                "{} values do not make a [{n}, {k}] matrix",
                weights.len()
            )));
        }
        if !available() {
            return Ok(None);
        }
        let k4 = k.div_ceil(4) * 4;
        let n_padded = n.div_ceil(TILE_COLUMNS) * TILE_COLUMNS;
        let mut packed = vec![0i8; n_padded * k4];
        let mut scales = vec![0f32; n];
        let mut offsets = vec![0i32; n];
        for (row, w) in weights.chunks_exact(k).enumerate() {
            let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if amax == 0.0 { 0.0 } else { 127.0 / amax };
            let (panel, lane) = (row / PANEL, row % PANEL);
            let mut sum = 0i32;
            for (i, &v) in w.iter().enumerate() {
                let q = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += i32::from(q);
                packed[panel * k4 * PANEL + (i / 4) * PANEL * 4 + lane * 4 + i % 4] = q;
            }
            scales[row] = scale;
            offsets[row] = 128 * sum;
        }
        Ok(Some(Self { n, k, k4, packed, scales, offsets }))
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
        let mut y = vec![0f32; m * self.n];
        if m == 0 {
            return y;
        }
        let (k, k4, n) = (self.k, self.k4, self.n);
        y.par_chunks_mut(ROWS_PER_TASK * n).zip(x.par_chunks(ROWS_PER_TASK * k)).for_each(|(y, x)| {
            let rows = x.len() / k;
            let mut activations = vec![128u8; rows * k4];
            let mut row_scales = vec![0f32; rows];
            for ((out, scale), x) in
                activations.chunks_exact_mut(k4).zip(&mut row_scales).zip(x.chunks_exact(k))
            {
                // SAFETY: `available()` held when the matrix was built (`from_f32` returns None
                // otherwise); `out` holds at least `k` bytes.
                *scale = unsafe { quantize_row(x, out) };
            }
            // SAFETY: as above; `activations` holds `rows` rows of `k4` bytes, `y` `rows` rows of
            // `n` values, and `packed`, `scales` and `offsets` cover whole tiles of outputs.
            unsafe { self.rows_product(&activations, &row_scales, rows, y) };
        });
        y
    }

    /// Every output of `rows` quantized rows, tile by tile.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows_product(&self, a: &[u8], row_scales: &[f32], rows: usize, y: &mut [f32]) {
        let blocks = self.packed.len() / (self.k4 * TILE_COLUMNS);
        for block in 0..blocks {
            let mut row = 0;
            while row + TILE_ROWS <= rows {
                self.tile::<TILE_ROWS>(a, row_scales, row, block, y);
                row += TILE_ROWS;
            }
            match rows - row {
                3 => self.tile::<3>(a, row_scales, row, block, y),
                2 => self.tile::<2>(a, row_scales, row, block, y),
                1 => self.tile::<1>(a, row_scales, row, block, y),
                _ => {}
            }
        }
    }

    /// Outputs `64·block ..` of rows `row .. row + R`: `s_x · s_w · (Σ (q_x + 128) q_w − 128 Σ q_w)`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // indices name registers (rows × panels)
    unsafe fn tile<const R: usize>(
        &self,
        a: &[u8],
        row_scales: &[f32],
        row: usize,
        block: usize,
        y: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let k4 = self.k4;
        let mut acc = [[_mm512_setzero_si512(); TILE_PANELS]; R];
        let rows: [*const u8; R] = std::array::from_fn(|r| a.as_ptr().add((row + r) * k4));
        let w = self.packed.as_ptr().add(block * k4 * TILE_COLUMNS);
        let panel_stride = k4 * PANEL;
        for step in 0..k4 / 4 {
            let b: [__m512i; TILE_PANELS] = std::array::from_fn(|p| {
                _mm512_loadu_si512(w.add(p * panel_stride + step * PANEL * 4) as *const _)
            });
            for r in 0..R {
                let x = _mm512_set1_epi32((rows[r].add(step * 4) as *const i32).read_unaligned());
                for p in 0..TILE_PANELS {
                    acc[r][p] = _mm512_dpbusd_epi32(acc[r][p], x, b[p]);
                }
            }
        }
        let first = block * TILE_COLUMNS;
        for p in 0..TILE_PANELS {
            let column = first + p * PANEL;
            if column >= self.n {
                break;
            }
            let live = (self.n - column).min(PANEL);
            let mask: __mmask16 = if live == PANEL { 0xFFFF } else { (1u16 << live) - 1 };
            let scales = _mm512_maskz_loadu_ps(mask, self.scales.as_ptr().add(column));
            let offsets = _mm512_maskz_loadu_epi32(mask, self.offsets.as_ptr().add(column));
            for r in 0..R {
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][p], offsets));
                let scale = _mm512_mul_ps(_mm512_set1_ps(row_scales[row + r]), scales);
                let out = y.as_mut_ptr().add((row + r) * self.n + column);
                _mm512_mask_storeu_ps(out, mask, _mm512_mul_ps(scale, sums));
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn rows_product(&self, _: &[u8], _: &[f32], _: usize, _: &mut [f32]) {
        unreachable!("Int8Matrix is built only where AVX-512 VNNI is available")
    }
}

/// One row of activations as `u8` (`q + 128`, `q = round(x / s)` to nearest-even,
/// `s = max|x| / 127`) into `out`; returns `s`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn quantize_row(x: &[f32], out: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    let chunks = x.len().div_ceil(16);
    let mask = |i: usize| -> __mmask16 {
        let live = (x.len() - i * 16).min(16);
        if live == 16 {
            0xFFFF
        } else {
            (1u16 << live) - 1
        }
    };
    let mut max = _mm512_setzero_ps();
    for i in 0..chunks {
        max = _mm512_max_ps(max, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask(i), x.as_ptr().add(i * 16))));
    }
    let amax = _mm512_reduce_max_ps(max);
    let inverse = _mm512_set1_ps(if amax == 0.0 { 0.0 } else { 127.0 / amax });
    let shift = _mm512_set1_epi32(128);
    for i in 0..chunks {
        let v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask(i), x.as_ptr().add(i * 16)), inverse);
        // Default rounding: to nearest-even; |v| ≤ 127, so q + 128 is in 1..=255.
        let q = _mm512_add_epi32(_mm512_cvtps_epi32(v), shift);
        _mm512_mask_cvtepi32_storeu_epi8(out.as_mut_ptr().add(i * 16) as *mut _, mask(i), q);
    }
    amax / 127.0
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quantize_row(_: &[f32], _: &mut [u8]) -> f32 {
    unreachable!("Int8Matrix is built only where AVX-512 VNNI is available")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// The kernel's sums are the exact integer products of the quantized values (computed here
    /// in i64 from the same quantization), for shapes with partial tiles, padded `k` and a row
    /// of zeros; and the product is close to the f32 one.
    #[test]
    fn int8_products_are_the_exact_sums_of_the_quantized_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI (Int8Matrix is never built here)");
            return;
        }
        for (m, n, k) in [(1, 16, 4), (7, 70, 30), (13, 130, 512), (5, 64, 2048), (70, 40, 36)] {
            let mut rand = xorshift(m as u64 * 1000 + n as u64);
            let w: Vec<f32> = (0..n * k).map(|_| rand()).collect();
            let mut x: Vec<f32> = (0..m * k).map(|_| rand() * 3.0).collect();
            x[..k].fill(0.0);
            let matrix = Int8Matrix::from_f32(&w, n, k).unwrap().unwrap();
            let y = matrix.matmul(&x, m);
            let quantize = |v: &[f32]| {
                let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                let inv = if amax == 0.0 { 0.0 } else { 127.0 / amax };
                (amax / 127.0, v.iter().map(|x| (x * inv).round_ties_even() as i64).collect::<Vec<_>>())
            };
            let mut worst = 0f32;
            for i in 0..m {
                let (sx, qx) = quantize(&x[i * k..(i + 1) * k]);
                for j in 0..n {
                    let (sw, qw) = quantize(&w[j * k..(j + 1) * k]);
                    let exact: i64 = qx.iter().zip(&qw).map(|(a, b)| a * b).sum();
                    let expected = sx * sw * exact as f32;
                    assert_eq!(y[i * n + j], expected, "[{m}x{k}]·[{n}x{k}]ᵀ at ({i}, {j})");
                    let float: f32 =
                        x[i * k..(i + 1) * k].iter().zip(&w[j * k..(j + 1) * k]).map(|(a, b)| a * b).sum();
                    worst = worst.max((y[i * n + j] - float).abs() / (k as f32).sqrt());
                }
            }
            assert!(worst < 0.05, "[{m}x{k}]: {worst}");
        }
    }
}
