//! `/v1/audio/transcriptions` and `/v1/audio/translations` without a speech model loaded: the form
//! is read and checked before any model is involved, and every mistake gets its OpenAI-shaped error.
//! (Transcripts and bad audio are in `real_whisper.rs`, on the real Whisper base weights.)

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};

use crate::support::{app, form, post_form, tiny_config};

const WAV_HEADER_ONLY: &[u8] = b"RIFF\x24\x00\x00\x00WAVEfmt ";

#[tokio::test]
async fn the_form_is_checked_before_any_model_runs() {
    let config = tiny_config("")
        .replace("[server]\n", "[server]\n        cors_allowed_origins = [\"https://app.example.com\"]\n")
        + "\n[server.routes.\"/v1/audio/transcriptions\"]\nmax_request_body_bytes = 4096\n";
    let app = app(&config).await;
    let path = "/v1/audio/transcriptions";
    let file = Some(("a.wav", WAV_HEADER_ONLY));

    // Not a form: 415, naming multipart.
    let reply = app.post_raw(path, "{}", Some("application/json")).await;
    reply.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None, None);
    assert!(reply.message().contains("multipart/form-data"), "{}", reply.text);
    app.post_raw(path, "x", None).await.assert_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, None, None);

    post_form(&app, path, form(file, &[])).await.assert_error(StatusCode::BAD_REQUEST, Some("model"), None);
    post_form(&app, path, form(file, &[("model", "nope")])).await.assert_error(
        StatusCode::NOT_FOUND,
        Some("model"),
        Some("model_not_found"),
    );
    post_form(&app, path, form(file, &[("model", "tiny-embed")])).await.assert_error(
        StatusCode::BAD_REQUEST,
        Some("model"),
        Some("model_kind_mismatch"),
    );
    post_form(&app, path, form(file, &[("model", "tiny-embed"), ("voice", "x")])).await.assert_error(
        StatusCode::BAD_REQUEST,
        Some("voice"),
        Some("unsupported_parameter"),
    );
    for (field, value) in [
        ("response_format", "docx"),
        ("temperature", "1.5"),
        ("temperature", "warm"),
        ("stream", "maybe"),
        ("timestamp_granularities[]", "syllable"),
    ] {
        let param = field.trim_end_matches("[]");
        post_form(&app, path, form(file, &[("model", "tiny-embed"), (field, value)])).await.assert_error(
            StatusCode::BAD_REQUEST,
            Some(param),
            None,
        );
    }
    // Timestamps need verbose_json; streams carry text.
    post_form(&app, path, form(file, &[("model", "m"), ("timestamp_granularities[]", "segment")]))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("timestamp_granularities"), None);
    // Word timestamps with verbose_json: the form is fine (the unknown model is what fails).
    post_form(
        &app,
        path,
        form(
            file,
            &[("model", "m"), ("response_format", "verbose_json"), ("timestamp_granularities[]", "word")],
        ),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, Some("model"), Some("model_not_found"));
    post_form(&app, path, form(file, &[("model", "m"), ("stream", "true"), ("response_format", "srt")]))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("stream"), None);
    // Translations take no `language` (OpenAI's API has none there).
    post_form(&app, "/v1/audio/translations", form(file, &[("model", "m"), ("language", "en")]))
        .await
        .assert_error(StatusCode::BAD_REQUEST, Some("language"), Some("unsupported_parameter"));

    // The route's own body limit (the upload limit): 413 stating it.
    let big = vec![0u8; 8192];
    let reply = post_form(&app, path, form(Some(("a.wav", &big)), &[("model", "tiny-embed")])).await;
    reply.assert_error(StatusCode::PAYLOAD_TOO_LARGE, None, Some("request_too_large"));
    assert!(reply.message().contains("4096"), "{}", reply.text);

    // A web page's form post: refused unless its origin is allowed.
    let page = |origin: &str| {
        Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=hearth-test-boundary-7f3a")
            .body(Body::from(form(file, &[("model", "tiny-embed")])))
            .unwrap()
    };
    app.send(page("https://evil.example")).await.assert_error(
        StatusCode::FORBIDDEN,
        None,
        Some("origin_not_allowed"),
    );
    let allowed = app.send(page("https://app.example.com")).await;
    allowed.assert_error(StatusCode::BAD_REQUEST, Some("model"), Some("model_kind_mismatch"));
}

#[test]
fn stt_entries_are_configured_and_checked() {
    let parse = |extra: &str| {
        hearth::config::Config::parse(
            &format!("[[models]]\nid = \"w\"\npreset = \"whisper-base\"\n{extra}"),
            None,
            &hearth::config::Overrides::default(),
        )
    };
    let config = parse("max_audio_secs = 60").unwrap();
    let hearth::config::KindConfig::Stt(stt) = &config.models[0].options else { panic!("not stt") };
    assert_eq!(stt.max_audio_secs, 60);
    assert_eq!(stt.backend, hearth::config::SttBackend::Auto);
    assert_eq!(stt.decoder_weights, hearth::config::DecoderWeights::Auto);
    let config = parse("backend = \"whisper-cpp\"\nfile = \"ggml-base-q8_0.bin\"\ncpu_threads = 3").unwrap();
    let hearth::config::KindConfig::Stt(stt) = &config.models[0].options else { panic!("not stt") };
    assert_eq!(stt.backend, hearth::config::SttBackend::WhisperCpp);
    assert_eq!((stt.file.as_deref(), stt.cpu_threads), (Some("ggml-base-q8_0.bin"), Some(3)));
    for file in ["whisper-base-q8_0.gguf", "model.safetensors"] {
        let config = parse(&format!("backend = \"candle\"\nfile = \"{file}\"")).unwrap();
        let hearth::config::KindConfig::Stt(stt) = &config.models[0].options else { panic!("not stt") };
        assert_eq!(stt.file.as_deref(), Some(file));
    }
    let config = parse("decoder_weights = \"float\"").unwrap();
    let hearth::config::KindConfig::Stt(stt) = &config.models[0].options else { panic!("not stt") };
    assert_eq!(stt.decoder_weights, hearth::config::DecoderWeights::Float);
    assert_eq!(stt.encoder_weights, hearth::config::EncoderWeights::Auto);
    let config = parse("encoder_weights = \"int8\"").unwrap();
    let hearth::config::KindConfig::Stt(stt) = &config.models[0].options else { panic!("not stt") };
    assert_eq!(stt.encoder_weights, hearth::config::EncoderWeights::Int8);
    assert!(parse("").is_ok());
    for (bad, field) in [
        ("max_audio_secs = 0", "max_audio_secs"),
        ("backend = \"onnx\"", "backend"),
        ("backend = \"candle\"\nfile = \"ggml-base.bin\"", "file"),
        ("backend = \"whisper-cpp\"\nfile = \"whisper-base-q8_0.gguf\"", "file"),
        ("file = \"../ggml-base.bin\"", "file"),
        ("cpu_threads = 0", "cpu_threads"),
        ("decoder_weights = \"int4\"", "decoder_weights"),
        ("backend = \"whisper-cpp\"\ndecoder_weights = \"q8_0\"", "decoder_weights"),
        ("encoder_weights = \"int4\"", "encoder_weights"),
        ("backend = \"whisper-cpp\"\nencoder_weights = \"int8\"", "encoder_weights"),
        ("pooling = \"mean\"", "pooling"),
        ("chat_template = \"x\"", "chat_template"),
    ] {
        let error = parse(bad).unwrap_err().to_string();
        assert!(error.contains(field), "{bad}: {error}");
    }
}
