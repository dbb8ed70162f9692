//! Turns a validated [`ModelConfig`] into a running model: resolves the weights in the models
//! directory, checks them against the config, starts the model's owner thread (which loads the
//! weights), and wraps it in the engine service for its kind. A rerank entry that names an
//! `embedding_model` gets that entry's loaded model instead of a second copy.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use hearth_backends::decoder::{Decoder, DecoderFiles, DecoderOptions, GgufFile, KvPrecision};
use hearth_backends::llm_vocab::{self, LlmVocab};
#[cfg(feature = "tts")]
use hearth_backends::piper::{PiperOptions, PiperVoices};
use hearth_backends::{gguf_tokenizer, whisper};
use hearth_backends::{
    BackendError, CandleCrossEncoder, CandleEmbedder, EncoderOptions, Head, LoadedEncoder, ModelDir,
    ModelsRoot,
};
use hearth_engine::admission::Admission;
use hearth_engine::embed::{Embedder, EmbeddingInfo, EncoderService, TextLimits};
use hearth_engine::encoder::{EncoderHandle, EncoderModel, WorkerConfig};
use hearth_engine::generate::scheduler::{SchedulerConfig, SchedulerHandle};
use hearth_engine::generate::service::{Generator, GeneratorParts};
use hearth_engine::generate::template::ChatTemplate;
use hearth_engine::pool::BlockingPool;
use hearth_engine::registry::{LoadState, Registry, Served};
use hearth_engine::rerank::Reranker;
use hearth_engine::synthesize::Synthesizer;
#[cfg(feature = "tts")]
use hearth_engine::synthesize::{SpeechSynthesizer, Synthesize, SynthesizerOptions};
use hearth_engine::tokenize::{LengthPolicy, TextTokenizer, TruncationSide};
use hearth_engine::transcribe::{Transcriber, TranscriberOptions};
use hearth_engine::Device;

use crate::config::{
    EncoderBackend, EncoderConfig, KindConfig, KvCacheType, LlmConfig, ModelConfig, RerankConfig,
    ScoringChoice, SttBackend, SttConfig, TextConfig, TtsConfig,
};
use crate::store::{downloads_allowed, Store};

/// How a backend loads an encoder on its owner thread (`CandleEmbedder::load`, …).
type LoadEncoder<M> = fn(&ModelDir, &EncoderOptions) -> Result<(M, LoadedEncoder), BackendError>;

pub struct Loader {
    store: Store,
    pool: Arc<BlockingPool>,
    registry: Arc<Registry>,
    /// ONNX Runtime's library, for `tts` voices.
    #[cfg_attr(not(feature = "onnx"), allow(dead_code))]
    onnxruntime: PathBuf,
}

impl Loader {
    pub fn new(
        models_dir: PathBuf,
        pool: Arc<BlockingPool>,
        registry: Arc<Registry>,
        onnxruntime: PathBuf,
    ) -> Self {
        Self { store: Store::new(models_dir), pool, registry, onnxruntime }
    }

    /// An estimate of the memory `config` takes once loaded: its weight files on disk, plus the KV
    /// cache for an LLM (`kv_cache_mib`, else the CPU default of 1 GiB). 0 for an entry sharing
    /// another's model, and for weights not downloaded yet (they are measured after the download).
    pub async fn footprint(&self, config: &ModelConfig) -> u64 {
        let Some(weights) = config.weights() else { return 0 };
        let kv = match &config.options {
            KindConfig::Llm(llm) => llm.kv_cache_bytes.unwrap_or(1 << 30) as u64,
            _ => 0,
        };
        let Ok(dir) = self.store.resolve(&weights.source, false).await else { return kv };
        let on_disk = tokio::task::spawn_blocking(move || weight_bytes(&dir)).await.unwrap_or(0);
        on_disk + kv
    }

    pub async fn load(&self, config: &ModelConfig) -> anyhow::Result<Served> {
        match &config.options {
            KindConfig::Llm(llm) => Ok(Served::Llm(Arc::new(self.generator(config, llm).await?))),
            KindConfig::Stt(stt) => Ok(Served::Stt(Arc::new(self.transcriber(config, stt).await?))),
            KindConfig::Tts(tts) => Ok(Served::Tts(Arc::new(self.synthesizer(config, tts).await?))),
            KindConfig::Embedding(encoder) => {
                let dir = self.inspect(encoder).await?;
                Ok(Served::Embedding(Arc::new(self.embedder(config, encoder, dir).await?)))
            }
            KindConfig::Rerank(RerankConfig::Load { encoder, scoring }) => {
                let dir = self.inspect(encoder).await?;
                let cross = match (scoring, dir.head) {
                    (ScoringChoice::BiEncoder, Head::SequenceClassification { .. }) => bail!(
                        "`scoring = \"bi-encoder\"` needs an embedding model, but {} is a cross-encoder",
                        dir.path.display()
                    ),
                    (ScoringChoice::CrossEncoder, Head::None) => bail!(
                        "`scoring = \"cross-encoder\"` needs a sequence-classification model, but {} is \
                         a bare encoder (set `scoring = \"bi-encoder\"` to rerank with its embeddings)",
                        dir.path.display()
                    ),
                    (_, head) => matches!(head, Head::SequenceClassification { .. }),
                };
                if cross {
                    let (service, _) = if self.onnx_backend(config, encoder, &dir)? {
                        self.onnx_cross_encoder(config, encoder, dir).await?
                    } else {
                        self.service(config, encoder, dir, CandleCrossEncoder::load).await?
                    };
                    return Ok(Served::Rerank(Reranker::cross_encoder(service, encoder.cache_bytes)));
                }
                let embedder = Arc::new(self.embedder(config, encoder, dir).await?);
                let limits = *embedder.limits();
                let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
                Ok(Served::Rerank(Reranker::BiEncoder { embedder, limits, admission }))
            }
            KindConfig::Rerank(RerankConfig::SharedEmbedder { embedding_model, text }) => {
                let entry = self
                    .registry
                    .get(embedding_model)
                    .with_context(|| format!("no model `{embedding_model}` is registered"))?;
                let embedder = match entry.settled().await {
                    LoadState::Ready(served) => match &*served {
                        Served::Embedding(embedder) => Arc::clone(embedder),
                        _ => bail!("`{embedding_model}` is not an embedding model"),
                    },
                    _ => bail!("its embedding model `{embedding_model}` is not loaded"),
                };
                let limits = shared_limits(text, &embedder)?;
                let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
                tracing::info!(model = %config.id, embedding_model = %embedding_model, "reranking with a shared embedding model");
                Ok(Served::Rerank(Reranker::BiEncoder { embedder, limits, admission }))
            }
        }
    }

    /// An LLM: its weights (a GGUF, or a safetensors folder), its tokenizer (`tokenizer.json` beside
    /// the weights, else the GGUF's own vocabulary), its chat template (the config's, else the
    /// model's), and its scheduler.
    async fn generator(&self, config: &ModelConfig, llm: &LlmConfig) -> anyhow::Result<Generator> {
        let dir = self.store.resolve(&llm.weights.source, downloads_allowed()).await?;
        let root = self.store.root().to_owned();
        let file = llm.file.clone();
        let (files, vocab) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let root = ModelsRoot::new(&root)?;
            let files = find_llm_files(&dir, file.as_deref(), &root)?;
            let optional = |name: &str| -> anyhow::Result<Option<PathBuf>> {
                Ok(root.join(&dir, name)?.filter(|p| p.is_file()))
            };
            let vocab = match &files {
                DecoderFiles::Gguf(path) => {
                    let gguf = GgufFile::open(path)?;
                    let mut vocab = gguf_tokenizer::from_gguf(&gguf.metadata());
                    if let Some(json) = optional("tokenizer.json")? {
                        let tokenizer = tokenizers::Tokenizer::from_file(&json)
                            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", json.display()))?;
                        // The GGUF still says which tokens begin and end sequences.
                        vocab = vocab.map(|v| LlmVocab { tokenizer, ..v });
                    }
                    vocab?
                }
                DecoderFiles::Safetensors { .. } => {
                    let json = optional("tokenizer.json")?.with_context(|| {
                        format!("{} has safetensors weights but no tokenizer.json", dir.display())
                    })?;
                    llm_vocab::from_hf_files(
                        &json,
                        optional("tokenizer_config.json")?.as_deref(),
                        optional("generation_config.json")?.as_deref(),
                        optional("chat_template.jinja")?.as_deref(),
                    )?
                }
            };
            Ok((files, vocab))
        })
        .await??;
        let template_source = llm.chat_template.clone().or_else(|| vocab.chat_template.clone());
        let template = match &template_source {
            Some(source) => {
                Some(ChatTemplate::new(source, &vocab.bos_text, &vocab.eos_text).with_context(|| {
                    format!("the chat template of model `{}` does not compile", config.id)
                })?)
            }
            None => {
                tracing::warn!(model = %config.id, "the model has no chat template and the config sets none; \
                    /v1/chat/completions will refuse it (set `chat_template`)");
                None
            }
        };
        let tokenizer = Arc::new(vocab.tokenizer);
        let scheduler_config = SchedulerConfig {
            model: Arc::clone(&config.id),
            queue_depth: llm.weights.queue_depth,
            max_running_sequences: llm.max_running_sequences,
            max_batch_tokens: llm.max_batch_tokens,
            kv_budget_bytes: llm.kv_cache_bytes,
            prefix_cache: llm.prefix_cache,
            eos_ids: vocab.eos_ids.clone(),
            max_queue_wait: llm.max_queue_wait,
        };
        let options = DecoderOptions {
            device: llm.weights.device,
            context_length: llm.context_length,
            threads: llm.cpu_threads,
            kv_precision: match llm.kv_cache_type {
                KvCacheType::F16 => KvPrecision::F16,
                KvCacheType::F32 => KvPrecision::F32,
            },
            ..Default::default()
        };
        let shown = match &files {
            DecoderFiles::Gguf(path) => path.display().to_string(),
            DecoderFiles::Safetensors { config, .. } => config.display().to_string(),
        };
        let (scheduler, loaded) =
            SchedulerHandle::start(scheduler_config, Arc::clone(&tokenizer), move || {
                Decoder::load_files(&files, &options).map_err(Into::into)
            })
            .await
            .map_err(|e| anyhow::anyhow!(e))
            .with_context(|| format!("cannot load model `{}` from {shown}", config.id))?;
        tracing::info!(
            model = %config.id,
            architecture = ?loaded.arch,
            layers = loaded.layers,
            context_length = scheduler.max_sequence_tokens(),
            tensors = %loaded.tensor_types,
            device = %loaded.device,
            "model loaded"
        );
        Ok(Generator::new(GeneratorParts {
            tokenizer,
            template,
            bos: if vocab.add_bos { vocab.bos } else { None },
            default_max_tokens: llm.max_tokens,
            max_output_tokens: llm.max_output_tokens,
            scheduler,
            admission: Admission::new(Arc::clone(&config.id), config.max_concurrent_requests),
            pool: Arc::clone(&self.pool),
        }))
    }

    /// A speech-to-text model: a CTranslate2, Transformers (safetensors) or GGUF Whisper on
    /// candle, or a ggml file on whisper.cpp, loaded on its owner thread.
    async fn transcriber(&self, config: &ModelConfig, stt: &SttConfig) -> anyhow::Result<Transcriber> {
        let dir = self.store.resolve(&stt.weights.source, downloads_allowed()).await?;
        let root = self.store.root().to_owned();
        let options = TranscriberOptions {
            queue_depth: stt.weights.queue_depth,
            max_concurrent_requests: config.max_concurrent_requests,
            max_audio_secs: f64::from(stt.max_audio_secs),
        };
        // Auto: candle for the weights it reads (CTranslate2, safetensors, GGUF), whisper.cpp for
        // a ggml file.
        let backend = match stt.backend {
            SttBackend::Auto => {
                let candle = match stt.file.as_deref() {
                    Some(file) => whisper::candle_reads_file(file),
                    None => whisper::candle_reads(&dir) || !whisper::has_ggml_file(&dir),
                };
                if candle {
                    SttBackend::Candle
                } else {
                    SttBackend::WhisperCpp
                }
            }
            chosen => chosen,
        };
        let (id, shown) = (Arc::clone(&config.id), dir.display().to_string());
        let started = match backend {
            SttBackend::WhisperCpp => self.whisper_cpp(config, stt, dir, options).await,
            _ => {
                let (device, dtype) = (stt.weights.device, stt.weights.dtype);
                let kept =
                    whisper::WhisperWeights { encoder: stt.encoder_weights, decoder: stt.decoder_weights };
                let file = stt.file.clone();
                Transcriber::start(Arc::clone(&config.id), options, Arc::clone(&self.pool), move || {
                    let root = ModelsRoot::new(&root)?;
                    let (model, vocab, loaded) =
                        whisper::load(&dir, file.as_deref(), &root, device, dtype, kept)?;
                    tracing::info!(
                        model = %id,
                        backend = "candle",
                        format = loaded.format,
                        mels = loaded.dims.n_mels,
                        encoder_layers = loaded.dims.n_audio_layer,
                        decoder_layers = loaded.dims.n_text_layer,
                        width = loaded.dims.n_state,
                        languages = vocab.languages.len(),
                        dtype = ?loaded.dtype,
                        decoder_q8 = loaded.decoder_q8,
                        encoder_int8 = loaded.encoder_int8,
                        device = %loaded.device,
                        "model loaded"
                    );
                    Ok((model, vocab))
                })
                .await
                .map_err(|e| anyhow::anyhow!(e))
            }
        };
        started.with_context(|| format!("cannot load model `{}` from {shown}", config.id))
    }

    #[cfg(not(feature = "whisper-cpp"))]
    async fn whisper_cpp(
        &self,
        config: &ModelConfig,
        _stt: &SttConfig,
        _dir: PathBuf,
        _options: TranscriberOptions,
    ) -> anyhow::Result<Transcriber> {
        bail!(
            "`stt` model `{}` needs whisper.cpp (a ggml file, or `backend = \"whisper-cpp\"`), and this \
             Hearth was built without it (build it with `--features whisper-cpp`, which needs `cmake`)",
            config.id
        )
    }

    #[cfg(feature = "whisper-cpp")]
    async fn whisper_cpp(
        &self,
        config: &ModelConfig,
        stt: &SttConfig,
        dir: PathBuf,
        options: TranscriberOptions,
    ) -> anyhow::Result<Transcriber> {
        if stt.weights.device != Device::Cpu && stt.weights.device != Device::Auto {
            bail!(
                "`stt` model `{}`: Hearth's whisper.cpp backend runs on the CPU; use `device = \"cpu\"` or the \
                 candle backend on a CTranslate2 folder for {}",
                config.id,
                stt.weights.device
            );
        }
        let root = self.store.root().to_owned();
        let (id, file) = (Arc::clone(&config.id), stt.file.clone());
        let threads =
            stt.cpu_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        Transcriber::start(Arc::clone(&config.id), options, Arc::clone(&self.pool), move || {
            let (model, vocab, loaded) =
                whisper::cpp::load(&dir, file.as_deref(), &ModelsRoot::new(&root)?, threads)?;
            tracing::info!(
                model = %id,
                backend = "whisper-cpp",
                file = %loaded.file.display(),
                ftype = loaded.ftype,
                mels = loaded.n_mels,
                encoder_layers = loaded.encoder_layers,
                decoder_layers = loaded.decoder_layers,
                width = loaded.width,
                languages = vocab.languages.len(),
                threads = loaded.threads,
                device = "cpu",
                "model loaded"
            );
            Ok((model, vocab))
        })
        .await
        .map_err(|e| anyhow::anyhow!(e))
    }

    /// A text-to-speech model: the Piper voices of its folders, on ONNX Runtime, on its owner
    /// thread.
    #[cfg(not(feature = "tts"))]
    async fn synthesizer(&self, config: &ModelConfig, _tts: &TtsConfig) -> anyhow::Result<Synthesizer> {
        bail!(
            "cannot load `tts` model `{}`: this Hearth was built without text to speech (build it with \
             `--features tts`, which links espeak-ng (GPL-3.0) and loads ONNX Runtime)",
            config.id
        )
    }

    #[cfg(feature = "tts")]
    async fn synthesizer(&self, config: &ModelConfig, tts: &TtsConfig) -> anyhow::Result<Synthesizer> {
        let dir = self.store.resolve(&tts.weights.source, downloads_allowed()).await?;
        let root = ModelsRoot::new(self.store.root())?;
        let mut folders = vec![dir.clone()];
        if let Some(voices) = &tts.voices_dir {
            // A voices folder that does not exist yet is fine (it may be created later); one that
            // leads outside the models directory is not.
            match root.existing(voices)? {
                Some(real) => folders.push(real),
                None => {
                    tracing::warn!(model = %config.id, folder = %voices.display(), "the voices folder does not exist yet");
                    folders.push(voices.clone());
                }
            }
        }
        let options = PiperOptions {
            device: tts.weights.device,
            onnxruntime: self.onnxruntime.clone(),
            folders,
            threads: tts.cpu_threads,
            noise_scale: tts.noise.scale,
            noise_w: tts.noise.width,
        };
        let service = SynthesizerOptions {
            queue_depth: tts.weights.queue_depth,
            max_concurrent_requests: config.max_concurrent_requests,
            max_input_chars: tts.max_input_chars,
            aliases: tts.voice_aliases.clone(),
            default_voice: tts.default_voice.clone(),
        };
        let id = Arc::clone(&config.id);
        let synthesizer = Synthesizer::start(Arc::clone(&config.id), service, move || {
            let voices = PiperVoices::load(options)?;
            let names: Vec<String> = voices.voices().into_iter().map(|v| v.id).collect();
            tracing::info!(model = %id, voices = ?names, "model loaded");
            Ok(voices)
        })
        .await
        .map_err(|e| anyhow::anyhow!(e))
        .with_context(|| format!("cannot load model `{}` from {}", config.id, dir.display()))?;
        for (alias, target) in &tts.voice_aliases {
            if synthesizer.resolve_voice(target).is_none() {
                tracing::warn!(model = %config.id, alias, voice = target, "`voice_aliases` names a voice that is not there");
            }
        }
        Ok(synthesizer)
    }

    async fn inspect(&self, encoder: &EncoderConfig) -> anyhow::Result<ModelDir> {
        let path = self.store.resolve(&encoder.weights.source, downloads_allowed()).await?;
        let root = self.store.root().to_owned();
        let inspect_path = path.clone();
        let dir =
            tokio::task::spawn_blocking(move || ModelDir::inspect(&inspect_path, &ModelsRoot::new(&root)?))
                .await??;
        if let Some(expected) = encoder.architecture {
            if expected != dir.architecture {
                bail!(
                    "`architecture` is `{expected}` but {} holds a `{}` model",
                    path.display(),
                    dir.architecture
                );
            }
        }
        Ok(dir)
    }

    async fn embedder(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: ModelDir,
    ) -> anyhow::Result<Embedder> {
        let max_positions = dir.max_positions;
        let (service, loaded) = if self.onnx_backend(config, encoder, &dir)? {
            self.onnx_embedder(config, encoder, dir).await?
        } else {
            self.service(config, encoder, dir, CandleEmbedder::load).await?
        };
        let info = EmbeddingInfo { dims: loaded.dims, vocab_size: loaded.vocab_size, max_positions };
        Ok(Embedder::new(service, info).with_cache(encoder.cache_bytes))
    }

    /// Whether an encoder (embedder or cross-encoder) runs on ONNX Runtime: asked for, or `auto`
    /// with an ONNX export in the folder, ONNX Runtime in the build and the CPU as the device.
    fn onnx_backend(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: &ModelDir,
    ) -> anyhow::Result<bool> {
        Ok(match encoder.backend {
            EncoderBackend::Candle => false,
            EncoderBackend::Onnx if cfg!(feature = "onnx") => true,
            EncoderBackend::Onnx => bail!(
                "model `{}` asks for `backend = \"onnx\"`, but this Hearth was built without ONNX Runtime \
                 (build with `--features onnx` or `tts`)",
                config.id
            ),
            EncoderBackend::Auto => {
                cfg!(feature = "onnx")
                    && dir.onnx.is_some()
                    && match encoder.weights.device {
                        Device::Cpu => true,
                        Device::Auto => {
                            hearth_backends::device::select_device(Device::Auto).is_ok_and(|d| d.is_cpu())
                        }
                        Device::Cuda(_) | Device::Metal => false,
                    }
            }
        })
    }

    #[cfg(feature = "onnx")]
    async fn onnx_embedder(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: ModelDir,
    ) -> anyhow::Result<(EncoderService<Vec<f32>>, LoadedEncoder)> {
        hearth_backends::onnx::onnx_environment(&self.onnxruntime)
            .with_context(|| format!("cannot load model `{}`", config.id))?;
        self.service(config, encoder, dir, hearth_backends::onnx_encoder::OnnxEmbedder::load).await
    }

    #[cfg(feature = "onnx")]
    async fn onnx_cross_encoder(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: ModelDir,
    ) -> anyhow::Result<(EncoderService<f32>, LoadedEncoder)> {
        hearth_backends::onnx::onnx_environment(&self.onnxruntime)
            .with_context(|| format!("cannot load model `{}`", config.id))?;
        self.service(config, encoder, dir, hearth_backends::onnx_encoder::OnnxCrossEncoder::load).await
    }

    #[cfg(not(feature = "onnx"))]
    async fn onnx_cross_encoder(
        &self,
        _config: &ModelConfig,
        _encoder: &EncoderConfig,
        _dir: ModelDir,
    ) -> anyhow::Result<(EncoderService<f32>, LoadedEncoder)> {
        unreachable!("onnx_backend() is false without the `onnx` feature")
    }

    #[cfg(not(feature = "onnx"))]
    async fn onnx_embedder(
        &self,
        _config: &ModelConfig,
        _encoder: &EncoderConfig,
        _dir: ModelDir,
    ) -> anyhow::Result<(EncoderService<Vec<f32>>, LoadedEncoder)> {
        unreachable!("onnx_backend() is false without the `onnx` feature")
    }

    /// Starts the owner thread of a text encoder and wraps it with its tokenizer, limits and
    /// admission.
    async fn service<M>(
        &self,
        config: &ModelConfig,
        encoder: &EncoderConfig,
        dir: ModelDir,
        load: LoadEncoder<M>,
    ) -> anyhow::Result<(EncoderService<M::Output>, LoadedEncoder)>
    where
        M: EncoderModel,
    {
        let tokenizer = load_tokenizer(dir.tokenizer.clone()).await?;
        let limits = text_limits(&encoder.text, &dir, &tokenizer)?;
        let options = EncoderOptions {
            device: encoder.weights.device,
            dtype: encoder.weights.dtype,
            pooling: encoder.pooling,
            normalize: encoder.normalize,
        };
        let worker_config = WorkerConfig {
            model: Arc::clone(&config.id),
            batch: encoder.batch,
            queue_depth: encoder.weights.queue_depth,
            max_queue_wait: encoder.max_queue_wait,
        };
        let (worker, loaded) =
            EncoderHandle::start(worker_config, move || load(&dir, &options).map_err(Into::into))
                .await
                .map_err(|e| anyhow::anyhow!(e))
                .with_context(|| format!("cannot load model `{}`", config.id))?;
        tracing::info!(
            model = %config.id,
            architecture = %loaded.architecture,
            device = %loaded.device,
            dtype = ?loaded.dtype,
            dims = loaded.dims,
            max_input_tokens = limits.length.max_tokens,
            "model loaded"
        );
        let admission = Admission::new(Arc::clone(&config.id), config.max_concurrent_requests);
        let service = EncoderService { tokenizer, worker, limits, admission, pool: Arc::clone(&self.pool) };
        Ok((service, loaded))
    }
}

/// The model's `.gguf` file: `file` if the config names one, else the only one in `dir`.
/// The weights in `dir`: the `.gguf` file `file` names or the only one there, else a Hugging Face
/// checkpoint (`config.json` and `*.safetensors`).
fn find_llm_files(
    dir: &std::path::Path,
    file: Option<&str>,
    root: &ModelsRoot,
) -> anyhow::Result<DecoderFiles> {
    if let Some(file) = file {
        let path = root.join(dir, file)?.with_context(|| format!("{} has no {file}", dir.display()))?;
        return Ok(DecoderFiles::Gguf(path));
    }
    let names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut ggufs: Vec<&String> = names.iter().filter(|name| name.ends_with(".gguf")).collect();
    ggufs.sort();
    let resolve = |name: &str| -> anyhow::Result<PathBuf> {
        root.join(dir, name)?.with_context(|| format!("{} vanished", dir.join(name).display()))
    };
    match ggufs.as_slice() {
        [one] => Ok(DecoderFiles::Gguf(resolve(one)?)),
        [] => {
            let mut shards: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors")).collect();
            shards.sort();
            if shards.is_empty() || !names.iter().any(|n| n == "config.json") {
                bail!(
                    "{} has no .gguf file and no Hugging Face checkpoint (config.json and *.safetensors)",
                    dir.display()
                );
            }
            Ok(DecoderFiles::Safetensors {
                config: resolve("config.json")?,
                shards: shards.into_iter().map(|s| resolve(s)).collect::<anyhow::Result<_>>()?,
            })
        }
        many => {
            let many: Vec<&str> = many.iter().map(|s| s.as_str()).collect();
            bail!("{} has several .gguf files ({}); set `file` to choose one", dir.display(), many.join(", "))
        }
    }
}

async fn load_tokenizer(path: PathBuf) -> anyhow::Result<Arc<TextTokenizer>> {
    let tokenizer = tokio::task::spawn_blocking(move || TextTokenizer::from_file(&path)).await?;
    Ok(Arc::new(tokenizer.map_err(|e| anyhow::anyhow!(e))?))
}

/// The configured limit, or the model's own (sentence-transformers' `max_seq_length`, else its
/// position table); never more than the position table allows.
fn text_limits(text: &TextConfig, dir: &ModelDir, tokenizer: &TextTokenizer) -> anyhow::Result<TextLimits> {
    let positions = dir.max_positions;
    let max_tokens = match text.max_input_tokens {
        Some(n) if n > positions => {
            bail!("`max_input_tokens` is {n} but the model has only {positions} positions")
        }
        Some(n) => n,
        None => dir
            .sentence_transformers
            .as_ref()
            .and_then(|st| st.max_seq_length)
            .unwrap_or(positions)
            .min(positions),
    };
    if max_tokens <= tokenizer.special_tokens_pair() {
        bail!("`max_input_tokens` ({max_tokens}) leaves no room beside the special tokens");
    }
    Ok(TextLimits {
        length: LengthPolicy { max_tokens, truncate: text.truncate, side: TruncationSide::Right },
        max_inputs: text.max_inputs_per_request,
        max_tokens: text.max_tokens_per_request,
    })
}

/// Limits of a rerank entry over a shared embedding model: its own, within the model's positions.
fn shared_limits(text: &TextConfig, embedder: &Embedder) -> anyhow::Result<TextLimits> {
    let positions = embedder.info().max_positions;
    let max_tokens = match text.max_input_tokens {
        Some(n) if n > positions => {
            bail!("`max_input_tokens` is {n} but the model has only {positions} positions")
        }
        Some(n) => n,
        None => embedder.limits().length.max_tokens,
    };
    Ok(TextLimits {
        length: LengthPolicy { max_tokens, truncate: text.truncate, side: TruncationSide::Right },
        max_inputs: text.max_inputs_per_request,
        max_tokens: text.max_tokens_per_request,
    })
}

/// Bytes of the weight files under `dir` (`.safetensors`, `.gguf`, `.bin`, `.onnx`), recursively.
fn weight_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|entry| {
            let path = entry.path();
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => weight_bytes(&path),
                Ok(meta) => {
                    let weights = path
                        .extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| matches!(e, "safetensors" | "gguf" | "bin" | "onnx"));
                    if weights {
                        meta.len()
                    } else {
                        0
                    }
                }
                Err(_) => 0,
            }
        })
        .sum()
}
