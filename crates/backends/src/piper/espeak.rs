//! Phonemes from espeak-ng, linked as a library (Debian `libespeak-ng-dev`). espeak-ng keeps its
//! state in globals and is not thread-safe, so one thread owns it for the whole process and every
//! voice's requests reach it through a channel ([`Espeak::global`]).
//!
//! espeak-ng is GPL-3.0: this module is compiled only with the `espeak` feature, and a binary
//! built with it is distributed under the GPL-3.0 (see the README).

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::mpsc;
use std::sync::OnceLock;

use super::{Clause, ClausePhonemizer, Terminator};
use crate::error::BackendError;

#[link(name = "espeak-ng")]
extern "C" {
    fn espeak_Initialize(output: c_int, buflength: c_int, path: *const c_char, options: c_int) -> c_int;
    fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    fn espeak_TextToPhonemes(
        textptr: *mut *const c_void,
        textmode: c_int,
        phonememode: c_int,
    ) -> *const c_char;
}

/// `AUDIO_OUTPUT_SYNCHRONOUS`: no sound device is opened.
const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_DONT_EXIT`: report a missing data folder instead of exiting the process.
const INITIALIZE_DONT_EXIT: c_int = 0x8000;
const CHARS_UTF8: c_int = 1;
const PHONEMES_IPA: c_int = 0x02;

struct Request {
    voice: String,
    text: String,
    reply: mpsc::Sender<Result<Vec<Clause>, String>>,
}

/// The handle to espeak-ng's owner thread.
#[derive(Clone)]
pub struct Espeak {
    requests: mpsc::Sender<Request>,
}

static GLOBAL: OnceLock<Result<Espeak, String>> = OnceLock::new();

impl Espeak {
    /// The process's espeak-ng, started on first use (its data from the default place, or
    /// `ESPEAK_DATA_PATH`).
    pub fn global() -> Result<Espeak, BackendError> {
        GLOBAL.get_or_init(Self::start).clone().map_err(BackendError::Unsupported)
    }

    fn start() -> Result<Espeak, String> {
        let (requests, inbox) = mpsc::channel::<Request>();
        let (ready, started) = mpsc::channel();
        std::thread::Builder::new()
            .name("espeak-ng".into())
            .spawn(move || {
                // SAFETY: called once, on the only thread that ever calls espeak-ng.
                let rate = unsafe {
                    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, std::ptr::null(), INITIALIZE_DONT_EXIT)
                };
                if rate <= 0 {
                    let _ = ready.send(Err(
                        "espeak-ng could not start: its data folder (espeak-ng-data) was not found; install \
                         Debian's `espeak-ng-data` or set ESPEAK_DATA_PATH"
                            .to_string(),
                    ));
                    return;
                }
                let _ = ready.send(Ok(()));
                let mut current_voice = String::new();
                while let Ok(request) = inbox.recv() {
                    let result = phonemize_here(&mut current_voice, &request.voice, &request.text);
                    let _ = request.reply.send(result);
                }
            })
            .map_err(|e| format!("could not start the espeak-ng thread: {e}"))?;
        started.recv().map_err(|_| "the espeak-ng thread died while starting".to_string())??;
        Ok(Espeak { requests })
    }
}

impl ClausePhonemizer for Espeak {
    fn clauses(&self, voice: &str, text: &str) -> Result<Vec<Clause>, String> {
        let (reply, answer) = mpsc::channel();
        self.requests
            .send(Request { voice: voice.to_string(), text: text.to_string(), reply })
            .map_err(|_| "the espeak-ng thread has stopped".to_string())?;
        answer.recv().map_err(|_| "the espeak-ng thread has stopped".to_string())?
    }
}

/// On espeak-ng's thread: clause by clause, with the punctuation that ended each (espeak-ng 1.51
/// does not report it, so it is read from the text the clause consumed).
fn phonemize_here(current_voice: &mut String, voice: &str, text: &str) -> Result<Vec<Clause>, String> {
    if current_voice != voice {
        let name = CString::new(voice).map_err(|_| "a voice name holds a NUL".to_string())?;
        // SAFETY: on espeak-ng's owner thread; the name is a valid C string for the call.
        if unsafe { espeak_SetVoiceByName(name.as_ptr()) } != 0 {
            return Err(format!("espeak-ng has no voice `{voice}`"));
        }
        *current_voice = voice.to_string();
    }
    // espeak reads up to a NUL, so the text must hold none.
    let text =
        CString::new(text.replace('\0', " ")).map_err(|_| "unreachable: NULs were replaced".to_string())?;
    let bytes = text.as_bytes();
    let start = text.as_ptr();
    let mut cursor: *const c_void = start.cast();
    let mut clauses = Vec::new();
    while !cursor.is_null() {
        let before = cursor as usize - start as usize;
        // SAFETY: `cursor` points into `text`, which outlives the call; espeak advances it to the
        // next clause or sets it to NULL at the end. The returned string is espeak's own buffer,
        // copied before the next call.
        let phonemes = unsafe {
            let out = espeak_TextToPhonemes(&mut cursor, CHARS_UTF8, PHONEMES_IPA);
            if out.is_null() {
                String::new()
            } else {
                CStr::from_ptr(out).to_string_lossy().into_owned()
            }
        };
        let after = if cursor.is_null() { bytes.len() } else { cursor as usize - start as usize };
        let mut consumed = String::from_utf8_lossy(&bytes[before.min(after)..after]).into_owned();
        if !cursor.is_null() {
            // espeak has read one character of the next clause ahead (it keeps it for that
            // clause), so the pointer is one past this clause's end.
            consumed.pop();
        }
        let (terminator, end_of_sentence) = terminator_of(&consumed, cursor.is_null());
        clauses.push(Clause { phonemes, terminator, end_of_sentence });
        if after == before && !cursor.is_null() {
            break; // no progress: never loop forever on input espeak cannot advance over
        }
    }
    Ok(clauses)
}

/// The punctuation a clause ended with, as espeak-ng classifies it (`.`, `?`, `!` end a
/// sentence; `,`, `:`, `;` and dashes do not; an ellipsis is a pause without a mark), read from
/// the end of the text the clause consumed. A clause that ends without punctuation (a paragraph
/// break, the end of the text) ends its sentence.
pub(super) fn terminator_of(consumed: &str, at_end: bool) -> (Option<Terminator>, bool) {
    let trimmed =
        consumed.trim_end().trim_end_matches(['"', '\'', ')', ']', '}', '»', '”', '’', '›']).trim_end();
    let run_start = trimmed
        .char_indices()
        .rev()
        .take_while(|(_, c)| matches!(c, '.' | '?' | '!' | ',' | ':' | ';' | '…' | '—' | '–'))
        .last()
        .map(|(i, _)| i);
    let Some(start) = run_start else {
        return (None, true);
    };
    let run = &trimmed[start..];
    if run.starts_with("..") || run.starts_with('…') {
        return (None, at_end);
    }
    match run.chars().next() {
        Some('.') => (Some(Terminator::Period), true),
        Some('?') => (Some(Terminator::Question), true),
        Some('!') => (Some(Terminator::Exclamation), true),
        Some(',') => (Some(Terminator::Comma), at_end),
        Some(':') => (Some(Terminator::Colon), at_end),
        Some(';') | Some('—') | Some('–') => (Some(Terminator::Semicolon), at_end),
        _ => (None, true),
    }
}
