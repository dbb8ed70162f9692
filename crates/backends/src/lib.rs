//! candle implementations of the engine's capability traits. This is the only crate that links candle:
//! it reads model directories (HF `config.json`, safetensors, sentence-transformers files), picks the
//! device and dtype, and runs forward passes. It knows nothing of queues or HTTP.

pub mod attention;
pub mod bert;
pub mod bert_family;
pub mod cpu_ops;
pub mod decoder;
pub mod decoder_source;
pub mod device;
pub mod error;
pub mod gguf_tokenizer;
pub mod int8;
pub mod llm_vocab;
pub mod model_dir;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(feature = "onnx")]
pub mod onnx_encoder;
pub mod piper;
pub mod quant;
pub mod whisper;

pub use bert_family::{CandleCrossEncoder, CandleEmbedder, EncoderOptions, LoadedEncoder};
pub use error::BackendError;
pub use model_dir::{is_plain_relative, Architecture, Head, ModelDir, ModelsRoot, SentenceTransformers};
