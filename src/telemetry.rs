//! Logging (`tracing`, text or JSON) and the Prometheus recorder behind `/metrics`.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LoggingConfig};

/// Installs the global subscriber. `level` is a filter directive (`info`, `hearth=debug,tower_http=info`).
pub fn init_logging(config: &LoggingConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.level)
        .map_err(|e| anyhow::anyhow!("invalid log level `{}`: {e}", config.level))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))
}

const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
const TOKEN_BUCKETS: &[f64] = &[16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0];

static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use. Must run before models load so
/// their workers register real (not no-op) metric handles.
pub fn metrics() -> PrometheusHandle {
    METRICS
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full("hearth_batch_size".into()), SIZE_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("hearth_batch_padded_tokens".into()),
                        TOKEN_BUCKETS,
                    )
                });
            let recorder = match builder {
                Ok(builder) => builder.build_recorder(),
                // Only an empty bucket list fails, and ours are constants.
                Err(e) => unreachable!("metric buckets are invalid: {e}"),
            };
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            handle
        })
        .clone()
}

/// Keeps histogram storage bounded; the exporter expects this to run periodically.
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("hearth_http_requests_total", "HTTP requests by route, model and status");
    describe_histogram!("hearth_http_request_duration_seconds", Unit::Seconds, "HTTP request latency");
    describe_gauge!("hearth_queue_depth", "Requests waiting in a model's queue");
    describe_gauge!("hearth_preprocess_queue_depth", "Tokenization tasks waiting for a preprocessing thread");
    describe_histogram!("hearth_queue_wait_seconds", Unit::Seconds, "Time from queueing to first batch");
    describe_histogram!("hearth_batch_size", "Sequences per forward pass");
    describe_histogram!("hearth_batch_padded_tokens", "Padded tokens per forward pass");
    describe_histogram!("hearth_batch_duration_seconds", Unit::Seconds, "Forward pass duration");
    describe_counter!("hearth_tokens_processed_total", "Tokens read by a model, special tokens included");
    describe_counter!("hearth_requests_cancelled_total", "Requests dropped because their client left");
}
