//! Whisper's log-mel features: a 400-point STFT (periodic Hann window, reflect padding, hop 160)
//! of 16 kHz audio, power spectra through Slaney-scale, Slaney-normalised mel filters, log10,
//! clamped to 8 below the maximum and scaled to about [-1, 1], as OpenAI's `log_mel_spectrogram`
//! computes them. Checked against an independent numpy implementation
//! (`scripts/reference/whisper_mel_numpy.py`) in the tests.

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

/// Whisper's STFT size (25 ms at 16 kHz) and hop (10 ms).
pub const N_FFT: usize = 400;
pub const HOP: usize = 160;
/// Frequency bins of one power spectrum.
pub const N_BINS: usize = N_FFT / 2 + 1;

/// Which mel features: 80 bins for most Whisper models, 128 for large-v3 and its turbo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MelConfig {
    pub n_mels: usize,
    pub sample_rate_hz: u32,
}

impl MelConfig {
    pub fn whisper(n_mels: usize) -> Self {
        MelConfig { n_mels, sample_rate_hz: crate::WHISPER_SAMPLE_RATE_HZ }
    }
}

/// Log-mel features, `n_mels` rows of `n_frames` values (row-major, as Whisper's encoder takes them).
#[derive(Debug, Clone, PartialEq)]
pub struct LogMel {
    pub n_mels: usize,
    pub n_frames: usize,
    pub data: Vec<f32>,
}

impl LogMel {
    /// Frames `start..start + len` of every row, padded with zeros past the end (Whisper's
    /// `pad_or_trim` of a window).
    pub fn window(&self, start: usize, len: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.n_mels * len];
        let available = self.n_frames.saturating_sub(start).min(len);
        for (row, chunk) in out.chunks_exact_mut(len).enumerate() {
            let from = row * self.n_frames + start;
            chunk[..available].copy_from_slice(&self.data[from..from + available]);
        }
        out
    }
}

/// One triangular filter: its weights over bins `first..first + weights.len()` (zero elsewhere).
#[derive(Debug, Clone)]
struct Filter {
    first: usize,
    weights: Vec<f32>,
}

/// A reusable log-mel computer (filters, window and FFT plan made once per model).
pub struct MelSpectrogram {
    config: MelConfig,
    filters: Vec<Filter>,
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
}

impl std::fmt::Debug for MelSpectrogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelSpectrogram").field("config", &self.config).finish_non_exhaustive()
    }
}

impl MelSpectrogram {
    pub fn new(config: MelConfig) -> Self {
        let dense = slaney_mel_filters(config.n_mels, config.sample_rate_hz, N_FFT);
        let filters = dense
            .chunks_exact(N_BINS)
            .map(|row| {
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = row.iter().rposition(|&w| w != 0.0).map_or(first, |last| last + 1);
                Filter { first, weights: row[first..last].iter().map(|&w| w as f32).collect() }
            })
            .collect();
        // torch.hann_window(400), periodic.
        let window = (0..N_FFT)
            .map(|n| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        MelSpectrogram { config, filters, window, fft }
    }

    pub fn config(&self) -> MelConfig {
        self.config
    }

    /// The dense filter bank, `n_mels × 201`, for tests and references.
    pub fn dense_filters(&self) -> Vec<f32> {
        let mut dense = vec![0f32; self.config.n_mels * N_BINS];
        for (row, filter) in self.filters.iter().enumerate() {
            let at = row * N_BINS + filter.first;
            dense[at..at + filter.weights.len()].copy_from_slice(&filter.weights);
        }
        dense
    }

    /// Log-mel features of `samples` followed by `pad_samples` zeros (Whisper pads 30 s so that
    /// every window is full): `(samples.len() + pad_samples) / 160` frames.
    pub fn log_mel(&self, samples: &[f32], pad_samples: usize) -> LogMel {
        let total = samples.len() + pad_samples;
        let n_mels = self.config.n_mels;
        let n_frames = total / HOP;
        let mut data = vec![0f32; n_mels * n_frames];
        if n_frames == 0 {
            return LogMel { n_mels, n_frames, data };
        }
        let half = N_FFT / 2;
        // torch.stft(center=True, pad_mode="reflect"): mirror `half` samples at each end
        // (not repeating the edge sample). Short inputs reflect as often as needed.
        let padded_len = total + 2 * half;
        let sample_at = |i: usize| -> f32 {
            if i < samples.len() {
                samples[i]
            } else {
                0.0
            }
        };
        let reflect = |position: isize| -> usize {
            let period = 2 * (total as isize - 1).max(1);
            let mut p = position.rem_euclid(period);
            if p >= total as isize {
                p = period - p;
            }
            p as usize
        };
        let padded = |i: usize| -> f32 { sample_at(reflect(i as isize - half as isize)) };
        debug_assert!(padded_len >= N_FFT);

        let mut frame = self.fft.make_input_vec();
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0f32; N_BINS];
        for t in 0..n_frames {
            let start = t * HOP;
            let interior = start >= half && start + N_FFT <= total + half;
            if interior && start - half + N_FFT <= samples.len() {
                let chunk = &samples[start - half..start - half + N_FFT];
                for ((out, &x), &w) in frame.iter_mut().zip(chunk).zip(&self.window) {
                    *out = x * w;
                }
            } else {
                for (n, out) in frame.iter_mut().enumerate() {
                    *out = padded(start + n) * self.window[n];
                }
            }
            // The input and output lengths are the plan's own, so this cannot fail.
            if self.fft.process_with_scratch(&mut frame, &mut spectrum, &mut scratch).is_err() {
                continue;
            }
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (row, filter) in self.filters.iter().enumerate() {
                let energy: f32 = filter.weights.iter().zip(&power[filter.first..]).map(|(w, p)| w * p).sum();
                data[row * n_frames + t] = energy.max(1e-10).log10();
            }
        }
        let max = data.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max - 8.0;
        for value in &mut data {
            *value = (value.max(floor) + 4.0) / 4.0;
        }
        LogMel { n_mels, n_frames, data }
    }
}

/// librosa's `filters.mel(sr, n_fft, n_mels, htk=False, norm="slaney")` over 0 Hz..sr/2.
fn slaney_mel_filters(n_mels: usize, sample_rate_hz: u32, n_fft: usize) -> Vec<f64> {
    const F_SP: f64 = 200.0 / 3.0;
    const MIN_LOG_HZ: f64 = 1000.0;
    const MIN_LOG_MEL: f64 = MIN_LOG_HZ / F_SP;
    let log_step = 6.4f64.ln() / 27.0;
    let hz_to_mel =
        |hz: f64| if hz >= MIN_LOG_HZ { MIN_LOG_MEL + (hz / MIN_LOG_HZ).ln() / log_step } else { hz / F_SP };
    let mel_to_hz = |mel: f64| {
        if mel >= MIN_LOG_MEL {
            MIN_LOG_HZ * (log_step * (mel - MIN_LOG_MEL)).exp()
        } else {
            mel * F_SP
        }
    };
    let n_bins = n_fft / 2 + 1;
    let nyquist = f64::from(sample_rate_hz) / 2.0;
    let max_mel = hz_to_mel(nyquist);
    let edges: Vec<f64> =
        (0..n_mels + 2).map(|i| mel_to_hz(max_mel * i as f64 / (n_mels + 1) as f64)).collect();
    let bin_hz: Vec<f64> = (0..n_bins).map(|k| k as f64 * f64::from(sample_rate_hz) / n_fft as f64).collect();
    let mut weights = vec![0f64; n_mels * n_bins];
    for m in 0..n_mels {
        let (low, centre, high) = (edges[m], edges[m + 1], edges[m + 2]);
        let norm = 2.0 / (high - low);
        for (k, &hz) in bin_hz.iter().enumerate() {
            let rising = (hz - low) / (centre - low);
            let falling = (high - hz) / (high - centre);
            weights[m * n_bins + k] = rising.min(falling).max(0.0) * norm;
        }
    }
    weights
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_whisper_count() {
        let mel = MelSpectrogram::new(MelConfig::whisper(80));
        let out = mel.log_mel(&vec![0.1; 16_000], 480_000);
        assert_eq!(out.n_frames, 3_100);
        assert_eq!(out.data.len(), 80 * 3_100);
    }

    #[test]
    fn filters_are_triangles_with_slaney_area() {
        let mel = MelSpectrogram::new(MelConfig::whisper(80));
        let dense = mel.dense_filters();
        for row in dense.chunks_exact(N_BINS) {
            assert!(row.iter().all(|&w| w >= 0.0));
            assert!(row.iter().any(|&w| w > 0.0), "every filter covers a bin at 80 mels");
        }
    }
}
