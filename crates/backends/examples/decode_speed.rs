//! A quick look at the decoder's raw speed on the CPU, without the server or the scheduler: for
//! profiling (`perf record`) and for trying kernels.
//!
//! `cargo run --release -p hearth-backends --example decode_speed -- MODEL.gguf [streams] [context] [steps]`
//!
//! Prefills `context` tokens into each of `streams` sequences, then decodes 64 greedy steps with all
//! of them in every step (or `steps`), and prints the prefill time and the decode tokens/s.
//! `HEARTH_PREFILL_CHUNK=N` prefills in chunks of N tokens, as the scheduler does.

use std::path::PathBuf;
use std::time::Instant;

use hearth_backends::decoder::{Decoder, DecoderOptions};
use hearth_engine::generate::model::{Chunk, DecoderModel};

fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best as u32
}

fn main() {
    let mut args = std::env::args().skip(1);
    let path =
        PathBuf::from(args.next().expect("usage: decode_speed MODEL.gguf [streams] [context] [steps]"));
    let streams: usize = args.next().map_or(1, |s| s.parse().expect("streams"));
    let context: usize = args.next().map_or(16, |s| s.parse().expect("context"));
    let steps: usize = args.next().map_or(64, |s| s.parse().expect("steps"));
    let (mut model, loaded) = Decoder::load(&path, &DecoderOptions::default()).expect("load");
    eprintln!("{loaded:?}");

    let prompts: Vec<Vec<u32>> = (0..streams)
        .map(|s| (0..context).map(|i| (100 + 7 * i + 13 * s) as u32 % 40_000).collect())
        .collect();
    let t = Instant::now();
    let mut next = Vec::new();
    // In chunks of `HEARTH_PREFILL_CHUNK` tokens (default: the whole prompt at once).
    let chunk: usize =
        std::env::var("HEARTH_PREFILL_CHUNK").ok().and_then(|c| c.parse().ok()).unwrap_or(context).max(1);
    for (s, prompt) in prompts.iter().enumerate() {
        let mut logits = Vec::new();
        for (i, part) in prompt.chunks(chunk).enumerate() {
            let last = (i + 1) * chunk >= prompt.len();
            let step = [Chunk { seq: s as u64, start: i * chunk, tokens: part, logits: last }];
            logits = model.step(&step).expect("prefill");
        }
        next.push(argmax(&logits[0]));
    }
    let prefill = t.elapsed().as_secs_f64();
    println!(
        "prefill {streams}×{context} tokens: {prefill:.3} s ({:.1} tok/s)",
        (streams * context) as f64 / prefill
    );

    let t = Instant::now();
    for step in 0..steps {
        let tokens: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let chunks: Vec<Chunk> = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| Chunk { seq: s as u64, start: context + step, tokens: t, logits: true })
            .collect();
        let logits = model.step(&chunks).expect("decode");
        next = logits.iter().map(|row| argmax(row)).collect();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "decode {streams} stream(s) × {steps} steps: {:.1} tok/s aggregate, {:.2} ms/step",
        (streams * steps) as f64 / secs,
        secs * 1000.0 / steps as f64
    );
}

/// The server's allocator, so the figures are the server's (see `src/lib.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
