//! One error type for everything that can be wrong with an uploaded audio file. Messages are
//! written for the client who sent it (they become a 400's message).

/// Why an upload could not be turned into samples.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum AudioError {
    #[error("the audio file is empty")]
    Empty,
    #[error(
        "the file is not audio in a format Hearth can read (supported: wav, mp3, flac, ogg (vorbis or opus), \
         webm/mkv (opus or vorbis), m4a/mp4 (aac), aac (adts))"
    )]
    UnknownFormat,
    #[error("the file has no audio track")]
    NoAudioTrack,
    #[error("the audio codec is not supported: {0}")]
    UnsupportedCodec(String),
    #[error("the audio is corrupt: {0}")]
    Corrupt(String),
    #[error("the audio file is truncated: it ends after {decoded_secs:.2} s of the {declared_secs:.2} s its header declares")]
    Truncated { decoded_secs: f64, declared_secs: f64 },
    #[error("the audio contains no samples")]
    NoSamples,
    #[error("the audio is silent (its loudest sample is below -70 dBFS)")]
    Silent,
    #[error("the audio is {duration_secs:.1} s long; this server accepts at most {max_secs:.1} s")]
    TooLong { duration_secs: f64, max_secs: f64 },
    #[error("the audio has {0} channels; Hearth reads at most 255")]
    TooManyChannels(usize),
    #[error("cannot resample from {from_hz} Hz to {to_hz} Hz: {detail}")]
    Resample { from_hz: u32, to_hz: u32, detail: String },
    /// Writing audio out failed (a server fault, not the client's).
    #[error("could not encode {format} audio: {message}")]
    Encode { format: String, message: String },
}

impl AudioError {
    /// A short stable code for the error body's `code` field.
    pub fn code(&self) -> &'static str {
        match self {
            AudioError::Empty => "empty_audio",
            AudioError::UnknownFormat => "unsupported_audio_format",
            AudioError::NoAudioTrack => "no_audio_track",
            AudioError::UnsupportedCodec(_) => "unsupported_audio_codec",
            AudioError::Corrupt(_) => "corrupt_audio",
            AudioError::Truncated { .. } => "truncated_audio",
            AudioError::NoSamples => "empty_audio",
            AudioError::Silent => "silent_audio",
            AudioError::TooLong { .. } => "audio_too_long",
            AudioError::TooManyChannels(_) => "unsupported_audio_channels",
            AudioError::Resample { .. } => "unsupported_sample_rate",
            AudioError::Encode { .. } => "audio_encoding_failed",
        }
    }
}
