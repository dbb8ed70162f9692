//! Audio in and out for Hearth's speech models: decode an upload in any common format to mono
//! samples, resample it to the rate a model wants, compute Whisper's log-mel features, and encode
//! synthesized speech as mp3, opus, aac (with the `aac` feature), flac, wav or pcm.
//!
//! Pure functions over byte slices and sample vectors: no models, no threads, no I/O beyond the
//! bytes handed in, so every step is tested in milliseconds. Bad input of every kind comes back as
//! an [`AudioError`] that names the problem in words a client can act on; nothing here panics on
//! request data.

#[cfg(feature = "aac")]
mod aac;
mod decode;
mod encode;
mod error;
pub mod mel;
mod resample;

pub use decode::{decode, DecodeLimits, Decoded};
pub use encode::{AudioFormat, Encoder};
pub use error::AudioError;
pub use mel::{LogMel, MelConfig};
pub use resample::{resample, StreamResampler};

/// The sample rate every Whisper model expects.
pub const WHISPER_SAMPLE_RATE_HZ: u32 = 16_000;

/// Decodes `bytes`, downmixes to mono and resamples to `rate_hz`: what a speech model is fed.
pub fn decode_to_rate(bytes: &[u8], limits: &DecodeLimits, rate_hz: u32) -> Result<Decoded, AudioError> {
    let decoded = decode(bytes, limits)?;
    if decoded.sample_rate_hz == rate_hz {
        return Ok(decoded);
    }
    let samples = resample(&decoded.samples, decoded.sample_rate_hz, rate_hz)?;
    Ok(Decoded { samples, sample_rate_hz: rate_hz, ..decoded })
}
