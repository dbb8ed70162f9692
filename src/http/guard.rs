//! Guards that run before any handler reads a body:
//! - the `Host` check: while Hearth listens on loopback, a request naming any other host is 403.
//!   A web page on `evil.example` whose DNS name is rebound to 127.0.0.1 still sends
//!   `Host: evil.example`, so it cannot reach a local Hearth (the attack class of Ollama's
//!   CVE-2024-28224);
//! - a per-route limit on requests in flight, refused at once with 429, so that no more than
//!   `max_concurrent_requests_per_route` bodies (each up to `max_request_body_bytes`) are ever held;
//! - API keys and per-key rate limits ([`authenticate`]): 401 without a configured key, 429 past
//!   the key's requests or tokens per minute, and the key's [`Caller`] for the handler.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, HOST};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::{insert_quota, ApiError};
use crate::auth::{Caller, Keyring};
use crate::config::ServerConfig;

/// Which `Host` values are answered.
#[derive(Clone, Debug)]
pub struct HostPolicy {
    /// Check at all: when listening on loopback, or when `allowed_hosts` is configured.
    enforce: bool,
    /// Listening on loopback: only loopback IP literals are this server's addresses.
    loopback_only: bool,
    allowed: Arc<[String]>,
}

impl HostPolicy {
    pub fn new(server: &ServerConfig) -> Self {
        let loopback_only = server.listens_on_loopback();
        Self {
            enforce: loopback_only || !server.allowed_hosts.is_empty(),
            loopback_only,
            allowed: server.allowed_hosts.clone().into(),
        }
    }

    /// Whether a request with this `Host` (or authority) value is answered.
    pub fn permits(&self, host: &str) -> bool {
        if !self.enforce {
            return true;
        }
        let name = host_name(host);
        match name.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            // An IP address cannot be a rebound name; off loopback it is one of this host's addresses.
            Ok(ip) => ip.is_loopback() || !self.loopback_only,
            Err(_) => name == "localhost" || name.ends_with(".localhost") || self.allowed.contains(&name),
        }
    }
}

/// The host part of a `Host` value, lowercased, without port or trailing dot.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = if host.starts_with('[') {
        host.split_inclusive(']').next().unwrap_or(host)
    } else {
        host.split(':').next().unwrap_or(host)
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Middleware (outermost): a refusal that may come before the request's body was read (401, 403,
/// 413, 415, 429) tells the client to close the connection. The unread body makes the connection
/// unusable, and without `Connection: close` a keep-alive client could send its next request on it
/// just as the server drops it.
pub async fn close_after_unread_body(request: Request, next: Next) -> Response {
    let has_body = !axum::body::HttpBody::is_end_stream(request.body());
    let mut response = next.run(request).await;
    let early = matches!(response.status().as_u16(), 401 | 403 | 413 | 415 | 429);
    if has_body && early {
        response
            .headers_mut()
            .insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    response
}

/// Middleware: 403 for a `Host` the policy does not permit. Requests without one (HTTP/1.0
/// clients) are no browser's and pass.
pub async fn check_host(State(policy): State<HostPolicy>, request: Request, next: Next) -> Response {
    let host =
        request.uri().authority().map(|a| a.as_str().to_owned()).or_else(|| {
            request.headers().get(HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        });
    match host {
        Some(host) if !policy.permits(&host) => {
            tracing::warn!(%host, "refused a request for another host (DNS rebinding?)");
            super::count_unmatched("403");
            ApiError::HostNotAllowed { host }.into_response()
        }
        _ => next.run(request).await,
    }
}

/// A route's cap on requests in flight.
#[derive(Clone)]
pub struct RouteLimit {
    route: &'static str,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl RouteLimit {
    pub fn new(route: &'static str, limit: usize) -> Self {
        Self { route, permits: Arc::new(Semaphore::new(limit)), limit }
    }
}

/// Middleware: 429 at once when the route has `limit` requests in flight, before the body is read.
/// The permit is held until the response is produced.
pub async fn limit_route(State(limit): State<RouteLimit>, request: Request, next: Next) -> Response {
    match Arc::clone(&limit.permits).try_acquire_owned() {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(_) => ApiError::Overloaded {
            message: format!(
                "{} has {} requests in flight, this server's limit per route; retry later",
                limit.route, limit.limit
            ),
            retry_after: std::time::Duration::from_secs(1),
        }
        .into_response(),
    }
}

/// Middleware: a request whose response has not started within the route's `request_timeout_secs`
/// gets 504; dropping the handler cancels its work (the model skips it, or frees its sequence).
pub async fn time_limit(State(limit): State<std::time::Duration>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout { limit }.into_response(),
    }
}

/// The key a request presents: `Authorization: Bearer KEY` (OpenAI's SDKs), else `x-api-key: KEY`
/// (Anthropic's and Cohere's clients).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (scheme, key) = v.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
    });
    bearer.or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim))
}

/// Middleware: without keys configured, every caller is anonymous. With keys, a request must
/// present one (401 otherwise), within its rate limits (429 with `Retry-After` and OpenAI's
/// `x-ratelimit-*` headers); the handler gets its [`Caller`], and the response the headers too.
pub async fn authenticate(State(keys): State<Arc<Keyring>>, mut request: Request, next: Next) -> Response {
    if !keys.enabled() {
        request.extensions_mut().insert(Caller::anonymous());
        return next.run(request).await;
    }
    let account = match presented_key(request.headers()) {
        None => {
            metrics::counter!("hearth_auth_failures_total", "reason" => "missing").increment(1);
            return ApiError::MissingApiKey.into_response();
        }
        Some(key) => match keys.find(key) {
            Some(account) => account,
            None => {
                metrics::counter!("hearth_auth_failures_total", "reason" => "invalid").increment(1);
                tracing::warn!("refused a request with an unknown API key");
                return ApiError::InvalidApiKey.into_response();
            }
        },
    };
    let quota = match account.admit() {
        Ok(quota) => quota,
        Err(limited) => {
            let labels = [("key", account.name.to_string()), ("limit", limited.kind.as_str().to_string())];
            metrics::counter!("hearth_rate_limited_total", &labels).increment(1);
            return ApiError::RateLimited { key: Arc::clone(&account.name), limited }.into_response();
        }
    };
    tracing::Span::current().record("key", &*account.name);
    request.extensions_mut().insert(Caller::of(account));
    let mut response = next.run(request).await;
    insert_quota(response.headers_mut(), &quota);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(host: &str, allowed: &[&str]) -> HostPolicy {
        let config = crate::config::Config::parse(
            &format!("[server]\nhost = \"{host}\"\nallowed_hosts = {allowed:?}\n"),
            None,
            &Default::default(),
        )
        .unwrap();
        HostPolicy::new(&config.server)
    }

    #[test]
    fn on_loopback_only_loopback_names_and_allowed_hosts_pass() {
        let p = policy("127.0.0.1", &["hearth.lan"]);
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "127.0.0.1:8080",
            "[::1]:8080",
            "api.localhost",
            "hearth.lan:80",
        ] {
            assert!(p.permits(ok), "{ok}");
        }
        for refused in
            ["evil.example", "evil.example:8080", "192.168.1.5", "localhost.evil.example", "hearth.lan.evil"]
        {
            assert!(!p.permits(refused), "{refused}");
        }
    }

    #[test]
    fn off_loopback_the_check_is_on_only_when_hosts_are_configured() {
        assert!(policy("0.0.0.0", &[]).permits("anything.example"));
        let p = policy("0.0.0.0", &["hearth.example.com"]);
        assert!(p.permits("hearth.example.com:8080"));
        assert!(p.permits("10.1.2.3:8080"), "kubelet probes use the pod IP");
        assert!(!p.permits("evil.example"));
    }
}

#[cfg(test)]
mod time_limit_tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_response_that_does_not_start_in_time_is_a_504_and_the_work_is_dropped() {
        let finished = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&finished);
        let slow = move || async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            "late"
        };
        let router = Router::new().route(
            "/slow",
            post(slow)
                .layer(axum::middleware::from_fn_with_state(Duration::from_millis(50), super::time_limit)),
        );
        let started = std::time::Instant::now();
        let response = router.oneshot(Request::post("/slow").body(Body::empty()).unwrap()).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(400), "{:?}", started.elapsed());
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let body: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["error"]["code"], "request_timeout");
        assert!(body["error"]["message"].as_str().unwrap().contains("0.05 s"), "{body}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            !finished.load(std::sync::atomic::Ordering::SeqCst),
            "the handler was dropped, not left running"
        );
    }
}
