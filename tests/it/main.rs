//! Hearth's integration tests: the real router, real config parsing and real (tiny) models, driven
//! without sockets. `--features real-weights` adds the tests on the real all-MiniLM-L6-v2 and
//! SmolLM2-135M-Instruct, Whisper base and Piper joe weights installed by `scripts/fetch-models`
//! (the Piper tests also need `--features tts`).

mod api_errors;
mod audio_api;
mod auth;
mod embeddings;
mod fuzz;
mod keep_alive;
mod lifecycle;
mod operations;
mod rag;
#[cfg(feature = "real-weights")]
mod real_llm;
#[cfg(all(feature = "real-weights", feature = "onnx"))]
mod real_onnx;
#[cfg(all(feature = "real-weights", feature = "tts"))]
mod real_piper;
#[cfg(all(feature = "real-weights", feature = "onnx"))]
mod real_rag;
#[cfg(feature = "real-weights")]
mod real_weights;
#[cfg(feature = "real-weights")]
mod real_whisper;
#[cfg(all(feature = "real-weights", feature = "whisper-cpp"))]
mod real_whisper_cpp;
#[cfg(feature = "real-weights")]
mod real_whisper_hf;
mod rerank;
mod security;
mod support;
