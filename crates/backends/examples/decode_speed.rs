//! A quick look at the decoder's raw speed on the CPU, without the server or the scheduler: for
//! profiling (`perf record`) and for trying kernels.
//!
//! `cargo run --release -p hearth-backends --example decode_speed -- MODEL.gguf [streams] [context]`
//!
//! Prefills `context` tokens into each of `streams` sequences, then decodes 64 greedy steps with all
//! of them in every step, and prints the prefill time and the decode tokens/s.

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
    let path = PathBuf::from(args.next().expect("usage: decode_speed MODEL.gguf [streams] [context]"));
    let streams: usize = args.next().map_or(1, |s| s.parse().expect("streams"));
    let context: usize = args.next().map_or(16, |s| s.parse().expect("context"));
    let steps = 64;
    let (mut model, loaded) = Decoder::load(&path, &DecoderOptions::default()).expect("load");
    eprintln!("{loaded:?}");

    let prompts: Vec<Vec<u32>> = (0..streams)
        .map(|s| (0..context).map(|i| (100 + 7 * i + 13 * s) as u32 % 40_000).collect())
        .collect();
    let t = Instant::now();
    let mut next = Vec::new();
    for (s, prompt) in prompts.iter().enumerate() {
        let logits =
            model.step(&[Chunk { seq: s as u64, start: 0, tokens: prompt, logits: true }]).expect("prefill");
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
