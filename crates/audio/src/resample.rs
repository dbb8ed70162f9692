//! Sample-rate conversion with a band-limited FFT resampler (rubato's `FftFixedInOut`): exact for
//! any pair of integer rates, with no aliasing from dropped samples.

use rubato::{FftFixedInOut, Resampler};

use crate::AudioError;

/// Input frames per FFT block; the resampler rounds it to a multiple its rate ratio needs.
const CHUNK_FRAMES: usize = 1024;

/// Resamples mono `samples` from `from_hz` to `to_hz`. The output has `len × to / from` samples
/// (rounded up), aligned with the input: the resampler's delay is removed.
pub fn resample(samples: &[f32], from_hz: u32, to_hz: u32) -> Result<Vec<f32>, AudioError> {
    if from_hz == to_hz || samples.is_empty() {
        return Ok(samples.to_vec());
    }
    let mut stream = StreamResampler::new(from_hz, to_hz)?;
    let mut output = stream.push(samples)?;
    output.extend(stream.finish()?);
    Ok(output)
}

/// [`resample`] over a stream that arrives in pieces: what it returns, piece by piece and then
/// at [`StreamResampler::finish`], is exactly `resample` of all the pieces joined, so audio made
/// in pieces has no seams. It holds back less than one FFT block (about 1,024 input samples) plus
/// the resampler's delay until more input or the end comes.
pub struct StreamResampler {
    from_hz: u32,
    to_hz: u32,
    /// `None` when the rates are equal (samples pass through).
    resampler: Option<FftFixedInOut<f32>>,
    block: Vec<Vec<f32>>,
    /// Input not yet a whole block.
    pending: Vec<f32>,
    pushed: u64,
    /// Output samples still to drop at the start (the resampler's delay).
    skip: usize,
    emitted: u64,
}

impl StreamResampler {
    pub fn new(from_hz: u32, to_hz: u32) -> Result<Self, AudioError> {
        let failed = |detail: String| AudioError::Resample { from_hz, to_hz, detail };
        if from_hz == 0 || to_hz == 0 {
            return Err(failed("a sample rate of 0 Hz".into()));
        }
        let resampler = if from_hz == to_hz {
            None
        } else {
            // An even number of the ratio's smallest blocks keeps the resampler's delay a whole
            // number of output samples, so removing it leaves no fractional shift.
            let smallest_block = (from_hz / gcd(from_hz, to_hz)) as usize;
            let blocks = CHUNK_FRAMES.div_ceil(smallest_block).next_multiple_of(2);
            Some(
                FftFixedInOut::<f32>::new(from_hz as usize, to_hz as usize, blocks * smallest_block, 1)
                    .map_err(|error| failed(error.to_string()))?,
            )
        };
        let (skip, block) = resampler
            .as_ref()
            .map_or((0, Vec::new()), |r| (r.output_delay(), vec![vec![0f32; r.output_frames_max()]]));
        Ok(StreamResampler {
            from_hz,
            to_hz,
            resampler,
            block,
            pending: Vec::new(),
            pushed: 0,
            skip,
            emitted: 0,
        })
    }

    fn failed(&self, error: impl std::fmt::Display) -> AudioError {
        AudioError::Resample { from_hz: self.from_hz, to_hz: self.to_hz, detail: error.to_string() }
    }

    /// Appends a block's output (less what is left of the delay) to `output`.
    fn take(&mut self, produced: usize, output: &mut Vec<f32>) {
        let skipped = self.skip.min(produced);
        self.skip -= skipped;
        output.extend_from_slice(&self.block[0][skipped..produced]);
        self.emitted += (produced - skipped) as u64;
    }

    /// Takes more input; returns the output that is final.
    pub fn push(&mut self, samples: &[f32]) -> Result<Vec<f32>, AudioError> {
        self.pushed += samples.len() as u64;
        if self.resampler.is_none() {
            return Ok(samples.to_vec());
        }
        self.pending.extend_from_slice(samples);
        let mut output = Vec::new();
        let mut position = 0;
        loop {
            let resampler = self.resampler.as_mut().expect("checked above");
            let needed = resampler.input_frames_next();
            if self.pending.len() - position < needed {
                break;
            }
            let input = [&self.pending[position..position + needed]];
            let result = resampler.process_into_buffer(&input, &mut self.block, None);
            let (_, produced) = result.map_err(|e| self.failed(e))?;
            position += needed;
            self.take(produced, &mut output);
        }
        self.pending.drain(..position);
        Ok(output)
    }

    /// Ends the stream: the held-back samples, and the output's length made `len × to / from`
    /// (rounded up) over everything pushed.
    pub fn finish(mut self) -> Result<Vec<f32>, AudioError> {
        let mut output = Vec::new();
        if self.resampler.is_none() || self.pushed == 0 {
            return Ok(output);
        }
        let wanted =
            (u128::from(self.pushed) * u128::from(self.to_hz)).div_ceil(u128::from(self.from_hz)) as u64;
        while self.emitted < wanted {
            let tail = std::mem::take(&mut self.pending);
            let input = [&tail[..]];
            let input = if tail.is_empty() { None } else { Some(&input[..]) };
            let resampler = self.resampler.as_mut().expect("checked above");
            let (_, produced) = resampler
                .process_partial_into_buffer(input, &mut self.block, None)
                .map_err(|e| self.failed(e))?;
            self.take(produced, &mut output);
        }
        let over = (self.emitted - wanted) as usize;
        output.truncate(output.len().saturating_sub(over));
        Ok(output)
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(rate_hz: u32, freq_hz: f32, secs: f32) -> Vec<f32> {
        let n = (rate_hz as f32 * secs) as usize;
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * freq_hz * i as f32 / rate_hz as f32).sin() * 0.5)
            .collect()
    }

    #[test]
    fn a_tone_keeps_its_frequency_phase_and_length() {
        for from in [8_000, 22_050, 44_100, 48_000] {
            let input = sine(from, 440.0, 1.0);
            let output = resample(&input, from, 16_000).unwrap();
            assert_eq!(output.len(), (input.len() * 16_000).div_ceil(from as usize), "{from} Hz");
            let expected = sine(16_000, 440.0, 1.0);
            // Away from the edges the resampled tone is the tone sampled at 16 kHz.
            let worst = (800..15_200).map(|i| (output[i] - expected[i]).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-3, "{from} Hz: worst error {worst}");
        }
    }

    /// Pieces of any sizes give exactly what the whole gives, at every rate pair speech uses.
    #[test]
    fn a_stream_in_pieces_equals_the_whole() {
        for (from, to) in [(22_050, 24_000), (16_000, 24_000), (44_100, 16_000), (24_000, 24_000)] {
            let input = sine(from, 440.0, 1.3);
            let whole = resample(&input, from, to).unwrap();
            for sizes in [&[7usize, 1_000, 3, 5_000][..], &[1_024], &[20_000], &[1]] {
                let mut stream = StreamResampler::new(from, to).unwrap();
                let (mut out, mut at, mut turn) = (Vec::new(), 0, 0);
                while at < input.len() {
                    let n = sizes[turn % sizes.len()].min(input.len() - at);
                    out.extend(stream.push(&input[at..at + n]).unwrap());
                    at += n;
                    turn += 1;
                }
                out.extend(stream.finish().unwrap());
                assert_eq!(out, whole, "{from} → {to} Hz in pieces of {sizes:?}");
            }
        }
        let stream = StreamResampler::new(22_050, 24_000).unwrap();
        assert!(stream.finish().unwrap().is_empty());
    }

    #[test]
    fn content_above_the_new_nyquist_is_removed_not_aliased() {
        // 7 kHz fits under 48 kHz's Nyquist and not under 8 kHz's: dropping samples would fold it
        // to 1 kHz at full strength.
        let output = resample(&sine(48_000, 7_000.0, 1.0), 48_000, 8_000).unwrap();
        let rms = (output[400..7_600].iter().map(|x| x * x).sum::<f32>() / 7_200.0).sqrt();
        assert!(rms < 0.01, "rms {rms}");
    }
}
