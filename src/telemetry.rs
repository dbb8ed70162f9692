//! Logging (`tracing`, text or JSON), optional OpenTelemetry trace export (OTLP over HTTP, the
//! `otlp` cargo feature), and the Prometheus recorder behind `/metrics`.

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::{LogFormat, LoggingConfig};

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// What must outlive the server for telemetry to be complete: the trace exporter, flushed on drop.
#[must_use = "dropping it stops the trace export"]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.traces.take() {
            if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                eprintln!("warning: the last traces were not exported: {e}");
            }
        }
    }
}

/// Where traces go: `[logging] otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT` (or its
/// `_TRACES_` form), else nowhere.
fn otlp_wanted(config: &LoggingConfig) -> bool {
    config.otlp_endpoint.is_some()
        || ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
            .iter()
            .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()))
}

/// Installs the global subscriber. `level` is a filter directive (`info`, `hearth=debug,tower_http=info`).
/// With an OTLP endpoint, spans (each request, and each model stage inside it) are exported too.
/// Call it before any async runtime exists (the exporter's HTTP client makes its own).
pub fn init_logging(config: &LoggingConfig) -> anyhow::Result<Telemetry> {
    let filter = EnvFilter::try_new(&config.level)
        .map_err(|e| anyhow::anyhow!("invalid log level `{}`: {e}", config.level))?;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    #[cfg_attr(not(feature = "otlp"), allow(unused_mut))]
    let mut layers: Vec<BoxedLayer> = vec![match config.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_current_span(true).boxed(),
    }];
    let telemetry = Telemetry {
        #[cfg(feature = "otlp")]
        traces: match otlp_wanted(config) {
            true => {
                let (layer, provider) = otlp::layer(config)?;
                layers.push(layer);
                Some(provider)
            }
            false => None,
        },
    };
    #[cfg(not(feature = "otlp"))]
    if otlp_wanted(config) {
        anyhow::bail!(
            "an OTLP endpoint is configured, but this binary was built without the `otlp` feature \
             (cargo build --release --features otlp)"
        );
    }
    tracing_subscriber::registry()
        .with(layers)
        .with(filter)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(telemetry)
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tracing_subscriber::Layer;

    use super::BoxedLayer;
    use crate::config::LoggingConfig;

    /// A tracing layer exporting spans in batches to the OTLP/HTTP (protobuf) endpoint.
    pub(super) fn layer(config: &LoggingConfig) -> anyhow::Result<(BoxedLayer, SdkTracerProvider)> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
        if let Some(endpoint) = &config.otlp_endpoint {
            let endpoint = endpoint.trim_end_matches('/');
            let traces = if endpoint.ends_with("/v1/traces") {
                endpoint.to_owned()
            } else {
                format!("{endpoint}/v1/traces")
            };
            exporter = exporter.with_endpoint(traces);
        }
        let exporter =
            exporter.build().map_err(|e| anyhow::anyhow!("cannot set up the OTLP exporter: {e}"))?;
        let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "hearth".into());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build();
        let tracer = provider.tracer("hearth");
        Ok((tracing_opentelemetry::layer().with_tracer(tracer).boxed(), provider))
    }
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
