//! AAC-LC in ADTS, the `aac` of OpenAI's speech endpoint: FFmpeg's native AAC encoder
//! (libavcodec, linked through `ffmpeg-sys-next`), one 1,024-sample frame at a time, each frame
//! behind its 7-byte ADTS header so the stream can be cut and played anywhere, as it is sent.
//!
//! Built with the `aac` feature (Debian `libavcodec-dev`, and libclang for the bindings). Debian's
//! libavcodec is built with `--enable-gpl`, so a binary linking it is GPL-licensed, as one built
//! with `tts` already is (README, "Licences").

use std::ffi::CStr;
use std::ptr;

use ffmpeg_sys_next as ff;

use crate::error::AudioError;

/// 64 kb/s, what the mp3 encoder uses: transparent for 24 kHz mono speech.
const BIT_RATE: i64 = 64_000;
/// ADTS `profile`: the MPEG-4 audio object type minus one (AAC-LC is object type 2).
const ADTS_PROFILE_LC: u8 = 1;
/// ADTS header length without a CRC.
const ADTS_HEADER_LEN: usize = 7;
/// The ADTS sampling frequency table (ISO/IEC 14496-3, 1.6.3.4); the index goes in the header.
const ADTS_RATES: [u32; 13] =
    [96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025, 8_000, 7_350];

/// One mono AAC stream. Owns its libavcodec context, frame and packet, freed on drop.
pub(crate) struct AacAdts {
    context: *mut ff::AVCodecContext,
    frame: *mut ff::AVFrame,
    packet: *mut ff::AVPacket,
    /// Samples per AAC frame (1,024 for AAC-LC), from the opened encoder.
    frame_size: usize,
    rate_index: u8,
    /// Samples not yet a whole frame.
    pending: Vec<f32>,
}

// SAFETY: the context, frame and packet are owned by this value alone (never shared, never
// aliased) and libavcodec keeps no thread-local state for an encoder, so moving it to another
// thread is sound; it is not `Sync`.
unsafe impl Send for AacAdts {}

impl AacAdts {
    pub(crate) fn new(sample_rate_hz: u32) -> Result<Self, AudioError> {
        let rate_index = ADTS_RATES
            .iter()
            .position(|&rate| rate == sample_rate_hz)
            .ok_or_else(|| aac_error(format!("AAC cannot encode {sample_rate_hz} Hz")))?
            as u8;
        // libavcodec logs to stderr by default, and its AAC encoder prints statistics at info
        // level on close: only errors reach stderr (failures come back as `AudioError` anyway).
        static QUIET: std::sync::Once = std::sync::Once::new();
        // SAFETY: setting the global log level is a plain store.
        QUIET.call_once(|| unsafe { ff::av_log_set_level(ff::AV_LOG_ERROR) });
        // SAFETY: every pointer libavcodec returns is checked before use; on any failure the
        // partly built value is dropped, which frees what was allocated.
        unsafe {
            let codec = ff::avcodec_find_encoder_by_name(c"aac".as_ptr());
            if codec.is_null() {
                return Err(aac_error("this libavcodec has no `aac` encoder"));
            }
            let mut encoder = AacAdts {
                context: ff::avcodec_alloc_context3(codec),
                frame: ff::av_frame_alloc(),
                packet: ff::av_packet_alloc(),
                frame_size: 0,
                rate_index,
                pending: Vec::new(),
            };
            if encoder.context.is_null() || encoder.frame.is_null() || encoder.packet.is_null() {
                return Err(aac_error("libavcodec could not allocate an encoder"));
            }
            let context = &mut *encoder.context;
            // The native encoder takes planar float only; mono has one plane.
            context.sample_fmt = ff::AVSampleFormat::AV_SAMPLE_FMT_FLTP;
            context.sample_rate = sample_rate_hz as i32;
            context.bit_rate = BIT_RATE;
            ff::av_channel_layout_default(&mut context.ch_layout, 1);
            check(ff::avcodec_open2(encoder.context, codec, ptr::null_mut()), "opening the encoder")?;
            encoder.frame_size = usize::try_from((*encoder.context).frame_size).unwrap_or(0);
            if encoder.frame_size == 0 {
                return Err(aac_error("the encoder reported no frame size"));
            }
            Ok(encoder)
        }
    }

    /// Encodes the whole frames among `pending + samples` and returns their ADTS frames.
    pub(crate) fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>, AudioError> {
        self.pending.extend(samples.iter().map(|s| s.clamp(-1.0, 1.0)));
        let whole = self.pending.len() / self.frame_size * self.frame_size;
        let mut out = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        for frame in pending[..whole].chunks(self.frame_size) {
            self.send(Some(frame), &mut out)?;
        }
        self.pending = pending[whole..].to_vec();
        Ok(out)
    }

    /// Encodes the last, shorter frame, drains the encoder's delay and returns the rest.
    pub(crate) fn finish(mut self) -> Result<Vec<u8>, AudioError> {
        let mut out = Vec::new();
        let tail = std::mem::take(&mut self.pending);
        if !tail.is_empty() {
            self.send(Some(&tail), &mut out)?;
        }
        self.send(None, &mut out)?;
        Ok(out)
    }

    /// Hands one frame of samples to the encoder (`None`: end of stream) and appends every
    /// packet it has ready, each behind its ADTS header.
    fn send(&mut self, samples: Option<&[f32]>, out: &mut Vec<u8>) -> Result<(), AudioError> {
        // SAFETY: the pointers are valid for this value's life (checked in `new`); the frame's
        // buffer is allocated for `samples.len()` floats in one plane before it is written.
        unsafe {
            match samples {
                Some(samples) => {
                    let frame = &mut *self.frame;
                    ff::av_frame_unref(self.frame);
                    frame.nb_samples = samples.len() as i32;
                    frame.format = ff::AVSampleFormat::AV_SAMPLE_FMT_FLTP as i32;
                    frame.sample_rate = (*self.context).sample_rate;
                    check(
                        ff::av_channel_layout_copy(&mut frame.ch_layout, &(*self.context).ch_layout),
                        "describing the frame",
                    )?;
                    check(ff::av_frame_get_buffer(self.frame, 0), "allocating a frame")?;
                    let plane = std::slice::from_raw_parts_mut(frame.data[0].cast::<f32>(), samples.len());
                    plane.copy_from_slice(samples);
                    check(ff::avcodec_send_frame(self.context, self.frame), "encoding")?;
                }
                None => check(ff::avcodec_send_frame(self.context, ptr::null()), "flushing")?,
            }
            loop {
                let received = ff::avcodec_receive_packet(self.context, self.packet);
                if received == ff::AVERROR(libc::EAGAIN) || received == ff::AVERROR_EOF {
                    return Ok(());
                }
                check(received, "receiving a packet")?;
                let packet = &*self.packet;
                let payload =
                    std::slice::from_raw_parts(packet.data, usize::try_from(packet.size).unwrap_or(0));
                let written = self.adts_header(payload.len()).map(|header| {
                    out.extend_from_slice(&header);
                    out.extend_from_slice(payload);
                });
                ff::av_packet_unref(self.packet);
                written?;
            }
        }
    }

    /// The 7-byte ADTS header (ISO/IEC 13818-7 / 14496-3 1.A.2): MPEG-4, no CRC, AAC-LC, the
    /// rate's index, one channel, the frame's length, buffer fullness "variable" (0x7FF), one raw
    /// data block.
    fn adts_header(&self, payload_len: usize) -> Result<[u8; ADTS_HEADER_LEN], AudioError> {
        let length = payload_len + ADTS_HEADER_LEN;
        if length >= 1 << 13 {
            return Err(aac_error(format!("an AAC frame of {payload_len} bytes does not fit ADTS")));
        }
        let length = length as u16;
        let channels: u8 = 1;
        Ok([
            0xFF,
            0xF1, // sync word's last 4 bits, MPEG-4, layer 0, no CRC
            (ADTS_PROFILE_LC << 6) | (self.rate_index << 2) | (channels >> 2),
            ((channels & 0b11) << 6) | (length >> 11) as u8,
            (length >> 3) as u8,
            (((length & 0b111) as u8) << 5) | 0x1F,
            0xFC,
        ])
    }
}

impl Drop for AacAdts {
    fn drop(&mut self) {
        // SAFETY: each free function takes a pointer to the pointer, accepts null and nulls it.
        unsafe {
            ff::av_packet_free(&mut self.packet);
            ff::av_frame_free(&mut self.frame);
            ff::avcodec_free_context(&mut self.context);
        }
    }
}

fn aac_error(message: impl Into<String>) -> AudioError {
    AudioError::Encode { format: "aac".to_string(), message: message.into() }
}

/// A libavcodec return code: negative is an error, named by `av_strerror`.
fn check(code: i32, doing: &str) -> Result<(), AudioError> {
    if code >= 0 {
        return Ok(());
    }
    let mut buf = [0 as std::ffi::c_char; 128];
    // SAFETY: `buf` is writable for its length; av_strerror always NUL-terminates within it.
    let message = unsafe {
        ff::av_strerror(code, buf.as_mut_ptr(), buf.len());
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    };
    Err(aac_error(format!("{doing}: {message}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adts_header_fields() {
        let encoder = AacAdts::new(24_000).unwrap();
        let header = encoder.adts_header(300).unwrap();
        assert_eq!(&header[..2], &[0xFF, 0xF1]);
        assert_eq!(header[2] >> 6, 1, "AAC-LC");
        assert_eq!((header[2] >> 2) & 0xF, 6, "24 kHz is index 6");
        let channels = ((header[2] & 1) << 2) | (header[3] >> 6);
        assert_eq!(channels, 1);
        let length = (usize::from(header[3] & 0b11) << 11)
            | (usize::from(header[4]) << 3)
            | usize::from(header[5] >> 5);
        assert_eq!(length, 307);
        assert!(AacAdts::new(23_000).is_err());
    }
}
