//! The configuration reference (`hearth config reference`, written to `docs/configuration.md`):
//! every key of every table, with its default and meaning. Tests compare each table's keys with the
//! keys its parser accepts (the serde structs' fields, and the per-kind key lists of `[[models]]`),
//! and the checked-in file with [`markdown`], so neither can drift from the code.

use std::fmt::Write as _;

/// One key: its name, its default (as written in TOML, or what happens when unset) and what it does.
pub struct Key {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

pub struct Section {
    /// The TOML table (`[server]`), or the kinds a `[[models]]` group applies to.
    pub table: &'static str,
    pub intro: &'static str,
    pub keys: &'static [Key],
}

const fn key(name: &'static str, default: &'static str, meaning: &'static str) -> Key {
    Key { name, default, meaning }
}

pub const TOP: Section = Section {
    table: "top level",
    intro: "",
    keys: &[key(
        "models_dir",
        "`$XDG_CACHE_HOME/hearth/models`",
        "Where models live (hub downloads, `hearth models pull` copies); `--models-dir` / `HEARTH_MODELS_DIR` override it.",
    )],
};

pub const SERVER: Section = Section {
    table: "[server]",
    intro: "The listener and the limits every model falls back on. Changes need a restart.",
    keys: &[
        key("host", "`\"127.0.0.1\"`", "Listen address (`--host`, `HEARTH_HOST`); `0.0.0.0` in containers."),
        key("port", "`8080`", "Listen port (`--port`, `HEARTH_PORT`); `0` picks a free one."),
        key("max_request_body_bytes", "`16777216`", "Larger bodies get 413."),
        key(
            "max_concurrent_requests_per_route",
            "`64`",
            "Requests in flight per route, counted before the body is read; more get 429.",
        ),
        key(
            "max_concurrent_requests",
            "`512`",
            "Per model default: requests admitted at once (tokenizing, queued or running); more get 429.",
        ),
        key("queue_depth", "`256`", "Per model default: requests waiting for the model; more get 429."),
        key("max_inputs_per_request", "`2048`", "Per model default: embedding inputs or rerank documents per request."),
        key("max_tokens_per_request", "`300000`", "Per model default: tokens of all inputs of one request together."),
        key(
            "max_queue_wait_ms",
            "`2000`",
            "Per model default: refuse (429, `Retry-After` from the estimate) a request that the work queued ahead would keep waiting longer (encoders: tokens ahead × time per token; LLMs: requests ahead × time between admissions); `0`: off.",
        ),
        key(
            "keep_alive",
            "`-1`",
            "Per model default: unload after this long without requests (seconds, or `\"30s\"`, `\"5m\"`, `\"1h\"`); `0`: about a second after the last; `-1`: never.",
        ),
        key(
            "model_load_timeout_secs",
            "`300`",
            "How long a request for an unloaded model waits for it to load before a 503.",
        ),
        key(
            "models_memory_mib",
            "unlimited",
            "Estimated memory all loaded models may take; least recently used idle models are unloaded to make room, and a load the models in use leave no room for gets 429.",
        ),
        key("preprocess_threads", "the CPU count", "Threads that tokenize for every model."),
        key(
            "onnxruntime_library",
            "`ORT_DYLIB_PATH`, else `$HEARTH_LIB_DIR/libonnxruntime.so` (`~/.cache/hearth/lib`)",
            "ONNX Runtime's shared library, loaded when the first model that runs on it loads (a `tts` voice, an encoder on `backend = \"onnx\"`/`auto`) (`scripts/fetch-models onnxruntime` installs it); missing: that model fails to load with an error naming the path.",
        ),
        key("preprocess_queue_depth", "`1024`", "Tokenization tasks waiting for those threads; more get 429."),
        key(
            "allowed_hosts",
            "`[]`",
            "`Host` names answered besides loopback names and IP addresses (DNS-rebinding protection).",
        ),
        key(
            "cors_allowed_origins",
            "`[]` (CORS off)",
            "`[\"*\"]` or a list of `scheme://host[:port]`; anything else stops startup.",
        ),
        key(
            "shutdown_timeout_secs",
            "`30`",
            "After SIGTERM, in-flight and queued work may run this long; what is left gets 503.",
        ),
        key(
            "request_timeout_secs",
            "`600`",
            "Per route default: a request whose response has not started after this long gets 504 and its work is dropped (a stream's body is bounded by its tokens); `0`: no limit.",
        ),
        key("routes", "`{}`", "Limits of single model routes: `[server.routes.\"ROUTE\"]` tables (below)."),
    ],
};

pub const ROUTES: Section = Section {
    table: "[server.routes.\"ROUTE\"]",
    intro: "One model route's own limits; ROUTE is `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/rerank`, `/rerank`, `/v1/audio/transcriptions`, `/v1/audio/translations` or `/v1/audio/speech`. Unset keys take the `[server]` values.",
    keys: &[
        key(
            "max_request_body_bytes",
            "`max_request_body_bytes`; `27262976` (26 MiB) for the audio routes",
            "Larger bodies get 413 (for the audio routes this is the upload limit: OpenAI's 25 MiB per file, plus the form).",
        ),
        key(
            "max_concurrent_requests",
            "`max_concurrent_requests_per_route`",
            "Requests in flight on the route, counted before the body is read; more get 429.",
        ),
        key("request_timeout_secs", "`request_timeout_secs`", "Until the response starts; beyond it, 504; `0`: no limit."),
    ],
};

pub const LOGGING: Section = Section {
    table: "[logging]",
    intro: "",
    keys: &[
        key(
            "format",
            "`\"text\"`",
            "`\"json\"` for one JSON object per line (`--log-format`, `HEARTH_LOG_FORMAT`).",
        ),
        key(
            "level",
            "`\"info\"`",
            "A tracing filter, e.g. `\"hearth=debug,tower_http=info\"` (`--log-level`, `HEARTH_LOG`).",
        ),
        key(
            "otlp_endpoint",
            "none (`OTEL_EXPORTER_OTLP_ENDPOINT`)",
            "Export traces (a span per request and per model stage) over OTLP/HTTP to this collector, e.g. `\"http://otel-collector:4318\"`; needs a binary built with `--features otlp`. `OTEL_SERVICE_NAME` names the service (default `hearth`).",
        ),
    ],
};

pub const AUTH: Section = Section {
    table: "[auth]",
    intro: "API keys. With none the server is open (a warning is logged when it listens beyond loopback). Keys and key settings change on SIGHUP.",
    keys: &[
        key(
            "keys_file",
            "none",
            "A keys file, one key per line: `KEY [NAME] [class=premium|standard] [rpm=N] [tpm=N] [admin=true]`, or `sha256:<digest>` for KEY. Relative to the config file; `--api-keys-file` / `HEARTH_API_KEYS_FILE` replace it. An empty file is an error.",
        ),
        key("metrics_require_key", "`false`", "`/metrics` needs a key too (restart to change)."),
        key("requests_per_minute", "unlimited", "The requests-per-minute limit of keys that set none."),
        key("tokens_per_minute", "unlimited", "The tokens-per-minute limit of keys that set none."),
        key("keys", "`[]`", "Keys in the config file: `[[auth.keys]]` tables (below)."),
    ],
};

pub const AUTH_KEYS: Section = Section {
    table: "[[auth.keys]]",
    intro: "One API key each. `HEARTH_API_KEY` adds one more (named `env`).",
    keys: &[
        key("name", "`\"key-N\"`", "Labels logs and metrics (never the key): 1 to 64 of letters, digits and `._-`."),
        key("key", "–", "The key, at least 16 printable characters. Set this or `sha256`."),
        key("sha256", "–", "The key's SHA-256 digest in hex (`printf %s \"$KEY\" | sha256sum`), so the file need not hold the key."),
        key("class", "`\"standard\"`", "`\"premium\"` requests overtake standard ones by two seconds in every queue, never starving them."),
        key("requests_per_minute", "the `[auth]` value", "Requests per minute (a token bucket); beyond it, 429 `rate_limit_exceeded`."),
        key("tokens_per_minute", "the `[auth]` value", "Tokens read and generated per minute; a request is admitted while the bucket is above zero."),
        key("admin", "`false`", "May use `POST /admin/models/{id}/load|unload|reload`."),
    ],
};

pub const MODEL_COMMON: Section = Section {
    table: "[[models]] (every kind)",
    intro: "One table per served model; a preset's `[defaults]` fill in what the entry does not set. Models change on SIGHUP.",
    keys: &[
        key("id", "required", "The name clients send as `model`: letters, digits and `._:/-`."),
        key("kind", "the preset's", "`llm`, `stt`, `tts`, `embedding` or `rerank`."),
        key("preset", "–", "A catalogue entry (`hearth models list`) giving the source, files and default options."),
        key(
            "source",
            "the preset's",
            "`hf:org/name[@revision]` (downloaded into `models_dir/hub`), or a directory inside `models_dir`.",
        ),
        key("files", "the kind's defaults", "Glob patterns of the hub files to fetch (`hf:` sources only)."),
        key("device", "`\"auto\"`", "`auto` (CUDA, then Metal, then CPU), `cpu`, `cuda`, `cuda:N`, `metal`."),
        key("dtype", "`\"auto\"`", "Encoders and `stt`: `auto` (f32 on CPU, f16 on GPUs), `f32`, `f16`, `bf16`."),
        key("max_concurrent_requests", "the `[server]` value", "Requests admitted at once; more get 429."),
        key("queue_depth", "the `[server]` value", "Requests waiting for the model; more get 429."),
        key("keep_alive", "the `[server]` value", "Unload after this long without requests; the next request loads it again."),
        key("preload", "`true`", "Load at startup; `false`: on the first request."),
    ],
};

pub const MODEL_ENCODER: Section = Section {
    table: "[[models]] (`embedding`, `rerank`)",
    intro: "",
    keys: &[
        key(
            "backend",
            "`\"auto\"`",
            "`auto`: ONNX Runtime on the CPU when the folder has an ONNX export (`onnx/model_quantized.onnx`, `model_qint8_*.onnx`, `onnx/model.onnx`, `model.onnx`, the int8 ones first) and the binary has ONNX Runtime (`--features onnx` or `tts`), candle otherwise; `candle` (exact f32, any device); `onnx` (on the CPU). Embedders and cross-encoders alike (ONNX cross-encoders output `logits` `[batch, 1]`, as Hugging Face's exports do).",
        ),
        key(
            "cache_mib",
            "`0` (off)",
            "An in-process cache of a model's outputs by exact token sequence, least recently used evicted, bounded to this many MiB: embeddings for an embedding model, relevance logits by (query, document) pair for a cross-encoder reranker (a bi-encoder reranker reads its embedding model's cache). A request whose inputs are all cached skips the queue; a partly cached one runs only its misses. `hearth_cache_hits_total`, `hearth_cache_misses_total`, `hearth_cache_bytes` in `/metrics`.",
        ),
        key("architecture", "from the weights", "`bert` or `xlm-roberta`; if set, must match `config.json`."),
        key("pooling", "the sentence-transformers config", "`mean`, `cls` or `last-token`."),
        key("normalize", "the sentence-transformers config", "L2-normalise embeddings."),
        key(
            "max_input_tokens",
            "the model's own limit",
            "Tokens per input; never more than the positions allow.",
        ),
        key("truncate", "`false` (embedding), `true` (rerank)", "Cut long inputs instead of answering 400."),
        key("max_batch_tokens", "`512` on CPU, `16384` on GPU", "Padded tokens (`sequences × longest`) per forward pass (a longer single input still runs, alone). On a CPU, passes of a few hundred tokens are the fastest per token (benches/README.md)."),
        key("max_batch_size", "`64`", "Sequences per forward pass."),
        key(
            "max_batch_memory_mib",
            "`1024` on CPU, `4096` on GPU",
            "Estimated peak activation memory per forward pass.",
        ),
        key("max_inputs_per_request", "the `[server]` value", "Inputs (or documents) per request."),
        key(
            "max_tokens_per_request",
            "the `[server]` value",
            "Tokens of all inputs of one request together.",
        ),
        key(
            "max_queue_wait_ms",
            "the `[server]` value",
            "Refuse a request the tokens queued ahead would keep waiting longer; `0`: off.",
        ),
    ],
};

pub const MODEL_RERANK: Section = Section {
    table: "[[models]] (`rerank`)",
    intro: "",
    keys: &[
        key("scoring", "`\"auto\"`", "`cross-encoder`, `bi-encoder`, or `auto` (from the checkpoint's head)."),
        key(
            "embedding_model",
            "–",
            "An `embedding` entry to rerank with as a bi-encoder, sharing its loaded weights and owner thread (then only `id`, `kind`, `max_concurrent_requests`, `max_input_tokens`, `truncate`, `max_inputs_per_request` and `max_tokens_per_request` may be set).",
        ),
    ],
};

pub const MODEL_LLM: Section = Section {
    table: "[[models]] (`llm`)",
    intro: "",
    keys: &[
        key("file", "the only `.gguf`", "Which `.gguf` in the model directory, when it holds several."),
        key("chat_template", "the model's", "A Jinja chat template to use instead of the model's own."),
        key(
            "context_length",
            "the model's trained context",
            "Fewer positions (less KV memory per sequence); at least 16.",
        ),
        key("max_tokens", "until the context is full", "New tokens when a request sets none."),
        key(
            "max_output_tokens",
            "the context",
            "The most new tokens a request may ask for (`max_tokens` above it: 400); also bounds requests that set none.",
        ),
        key("max_running_sequences", "`16`", "Sequences decoded together."),
        key("max_batch_tokens", "`512`", "Tokens per decode step (decoded tokens plus prompt chunks)."),
        key(
            "kv_cache_mib",
            "`1024` on CPU, `4096` on GPU",
            "KV-cache memory for running sequences and the prefix cache.",
        ),
        key("kv_cache_type", "`\"f16\"`", "KV-cache element type on the CPU: `f16` or `f32`."),
        key("cpu_threads", "one per core", "The model's own CPU thread pool."),
        key("prefix_cache", "`true`", "Keep finished prompts' KV entries for reuse."),
        key(
            "max_queue_wait_ms",
            "the `[server]` value",
            "Refuse (429) a request that the requests waiting ahead × the recent time between admissions would keep from a place longer; `0`: off.",
        ),
    ],
};

pub const MODEL_STT: Section = Section {
    table: "[[models]] (`stt`)",
    intro: "Whisper on candle from a CTranslate2 folder (the faster-whisper format: `model.bin`, `config.json`, `tokenizer.json`), a Transformers checkpoint (`openai/whisper-*`: `model.safetensors` in f32, f16 or bf16, or shards with their index, `config.json`, `generation_config.json`, `tokenizer.json`) or a GGUF file with Transformers' tensor names (candle's quantized Whisper files, beside a Transformers `config.json` and `tokenizer.json`; its matrices are widened to the model's dtype when loading), on any device; or a ggml file (whisper.cpp's format: `ggml-base.bin` and the like, float16 or quantized) on whisper.cpp, which needs a binary built with `--features whisper-cpp` (and `cmake` to build it). A ggml file carries no BPE merges, so its folder also holds the same Whisper's `tokenizer.json` (and `config.json` for the suppress lists and language ids; both come with any CTranslate2 or Hugging Face folder of that model). Hearth's decoding rules drive both backends alike; whisper.cpp runs on the CPU and does not time words (`timestamp_granularities[]=word` gets 400).",
    keys: &[
        key(
            "max_audio_secs",
            "`1800`",
            "Longer uploads get 400 `audio_too_long` (from the container's declared length when it has one, before decoding).",
        ),
        key(
            "backend",
            "`\"auto\"`",
            "`auto`: candle on a folder with `model.bin`, `*.safetensors` or a `.gguf` file (or a `file` of those), whisper.cpp on one with only a ggml file (`ggml*.bin`, or a `file` of another name); `candle`; `whisper-cpp`.",
        ),
        key(
            "file",
            "candle: `model.bin`, else `model.safetensors` (or the shards of `model.safetensors.index.json`), else the only `.gguf`; whisper.cpp: the only `ggml*.bin`",
            "Which weights file of the folder to load, when it holds several: a `.safetensors` or `.gguf` file (candle) or a ggml file (whisper.cpp).",
        ),
        key("cpu_threads", "one per core", "whisper.cpp's threads for each encoder or decoder pass."),
        key(
            "decoder_weights",
            "`\"auto\"`",
            "candle: `auto` (on the CPU in f32, the decoder's layer matrices in Q8_0 and its output projection in f16: the same transcripts, faster decoding), `float` (the model's dtype), `q8_0`.",
        ),
        key(
            "encoder_weights",
            "`\"auto\"`",
            "candle: `auto` (in f32 on a CPU with AVX-512 VNNI, the encoder's matrices in int8 per row with activations quantized per 128-input block on the fly: faster encoder windows, the same test transcripts; float elsewhere), `float` (the model's dtype), `int8` (an error on a CPU without VNNI).",
        ),
    ],
};

pub const MODEL_TTS: Section = Section {
    table: "[[models]] (`tts`)",
    intro: "Piper voices: every `*.onnx` with its `*.onnx.json` in the `source` folder (and in `voices_dir`) is a voice named by its file stem (`stem:speaker` for each speaker of a multi-speaker voice). Needs a binary built with `--features tts`. `device`: `cpu` or `cuda[:N]` (ONNX Runtime's CUDA provider, which needs the GPU build of ONNX Runtime).",
    keys: &[
        key(
            "voices_dir",
            "none",
            "A folder inside the models directory of more voices (custom-trained Piper voices): looked at again on `SIGHUP`, so a voice dropped in is served without a restart.",
        ),
        key(
            "default_voice",
            "the first voice by name",
            "The voice OpenAI's voice names (`alloy`, `ash`, `ballad`, `cedar`, `coral`, `echo`, `fable`, `marin`, `nova`, `onyx`, `sage`, `shimmer`, `verse`) speak with when `voice_aliases` does not map them.",
        ),
        key("voice_aliases", "none", "A table of request voice names → voice ids, e.g. `{ nova = \"en_US-amy-medium\" }`."),
        key("max_input_chars", "`4096`", "Longer `input` gets 400 (OpenAI's limit)."),
        key("cpu_threads", "ONNX Runtime's (physical cores)", "ONNX Runtime's intra-op threads for this model's voices."),
        key("noise_scale", "the voice's (`inference.noise_scale`)", "Piper's generator noise, 0–2."),
        key("noise_w", "the voice's (`inference.noise_w`)", "Piper's phoneme-duration noise, 0–2; with `noise_scale = 0` too, the same input always gives the same samples."),
    ],
};

pub const RAG: Section = Section {
    table: "[rag]",
    intro: "Files and vector stores (`/v1/files`, `/v1/vector_stores`, the `rag` extension of chat). Present: enabled; absent: those routes answer 404. Changes need a restart.",
    keys: &[
        key("data_dir", "`$HEARTH_DATA_DIR`, else `$XDG_DATA_HOME/hearth`", "Where uploads, the SQLite record and the indexes live (`--data-dir`, `HEARTH_DATA_DIR` override it)."),
        key("embedding_model", "the first embedding model", "Id of the configured embedding model that embeds chunks and queries; a store keeps its dimension and refuses another model's vectors."),
        key("rerank_model", "the first rerank model, if any", "Id of the configured rerank model that reorders fused candidates (search's `ranking_options.ranker = \"none\"` skips it)."),
        key("max_file_bytes", "`67108864`", "Largest upload to `/v1/files`; larger gets 413."),
        key("ingest_concurrency", "`2`", "Files extracted, chunked and embedded at once; the rest wait `in_progress`."),
        key("candidates", "`50`", "Candidates each ranking (dense, BM25) contributes before fusion."),
        key("rerank_candidates", "`20`", "Fused candidates the reranker reads per search."),
        key("dense_weight", "`0.6`", "Weight of the dense ranking in the fusion (`0`: BM25 only)."),
        key("lexical_weight", "`0.4`", "Weight of the BM25 ranking in the fusion (`0`: dense only)."),
        key("fusion", "`\"relative_score\"`", "How the two rankings merge: `relative_score` (each ranking's scores rescaled to 0..1 over its candidates, then weighted and averaged; keeps margins) or `rrf` (reciprocal rank fusion: Σ weight / (k + rank); orders only)."),
        key("rrf_k", "`60`", "Reciprocal rank fusion's constant, with `fusion = \"rrf\"`."),
        key("exact_below", "`20000`", "Stores with fewer vectors are searched exactly (brute force), larger ones through the HNSW graph."),
        key("half_precision", "`false`", "Keep vectors in the graph as f16 (half the memory)."),
        key("save_interval_secs", "`30`", "How often changed vector indexes are saved (and at shutdown); after a crash the rest is replayed from SQLite."),
    ],
};

pub const SECTIONS: &[&Section] = &[
    &TOP,
    &SERVER,
    &ROUTES,
    &LOGGING,
    &AUTH,
    &AUTH_KEYS,
    &RAG,
    &MODEL_COMMON,
    &MODEL_ENCODER,
    &MODEL_RERANK,
    &MODEL_LLM,
    &MODEL_STT,
    &MODEL_TTS,
];

/// The reference as Markdown (what `hearth config reference` prints).
pub fn markdown() -> String {
    let mut out = String::from(
        "# Configuration reference\n\n\
         Generated by `hearth config reference` from the config parser's own tables; CI checks that\n\
         this file matches it. Unknown keys are errors. Durations and sizes are in the unit their\n\
         name says (`_ms`, `_secs`, `_mib`, `_bytes`).\n",
    );
    for section in SECTIONS {
        let _ = write!(out, "\n## {}\n\n", section.table);
        if !section.intro.is_empty() {
            let _ = write!(out, "{}\n\n", section.intro);
        }
        out.push_str("| key | default | meaning |\n|---|---|---|\n");
        for key in section.keys {
            let _ = writeln!(out, "| `{}` | {} | {} |", key.name, key.default, key.meaning);
        }
    }
    out
}

/// The field names a serde struct accepts, learnt from what its derived `Deserialize` asks for.
#[cfg(test)]
pub(super) fn fields_of<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
    use serde::de::Visitor;

    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("stop")
        }
    }
    impl std::error::Error for Stop {}
    impl serde::de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    struct Recorder<'a>(&'a mut Vec<&'static str>);
    impl<'de> serde::Deserializer<'de> for Recorder<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0.extend_from_slice(fields);
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Recorder(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::config::{auth, model, RawConfig, RawLogging, RawRoute, RawServer};

    fn names(section: &Section) -> BTreeSet<&'static str> {
        section.keys.iter().map(|k| k.name).collect()
    }

    fn set(keys: &[&'static str]) -> BTreeSet<&'static str> {
        keys.iter().copied().collect()
    }

    #[test]
    fn every_table_lists_exactly_the_keys_its_parser_accepts() {
        let mut top = set(&fields_of::<RawConfig>());
        for table in ["server", "logging", "auth", "rag"] {
            assert!(top.remove(table), "{table}");
        }
        assert_eq!(names(&TOP), top);
        assert_eq!(names(&SERVER), set(&fields_of::<RawServer>()));
        assert_eq!(names(&ROUTES), set(&fields_of::<RawRoute>()));
        assert_eq!(names(&LOGGING), set(&fields_of::<RawLogging>()));
        assert_eq!(names(&AUTH), set(&fields_of::<auth::RawAuth>()));
        assert_eq!(names(&AUTH_KEYS), set(&fields_of::<auth::RawKey>()));
        assert_eq!(names(&RAG), set(&crate::config::rag::raw_fields()));
        assert_eq!(names(&MODEL_COMMON), set(model::COMMON_KEYS));
        assert_eq!(names(&MODEL_ENCODER), set(model::ENCODER_KEYS));
        assert_eq!(names(&MODEL_RERANK), set(model::RERANK_KEYS));
        assert_eq!(names(&MODEL_LLM), set(model::LLM_KEYS));
        assert_eq!(names(&MODEL_STT), set(model::STT_KEYS));
        assert_eq!(names(&MODEL_TTS), set(model::TTS_KEYS));
    }

    #[test]
    fn the_checked_in_reference_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md");
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == markdown(),
            "{} is out of date: run `hearth config reference > docs/configuration.md`",
            path.display()
        );
    }
}
