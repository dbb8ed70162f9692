"""OpenTelemetry trace export (the `otlp` cargo feature, which scripts/test builds): the real binary
sends its spans over OTLP/HTTP to a stand-in collector (an HTTP server here that records what it
receives; the payload is OTLP protobuf, read here only for the strings it carries)."""

from __future__ import annotations

import http.server
import threading

import pytest

from conftest import EMBED_MODEL, base_env, httpx, launch, models_dir, run_cli


class Collector(http.server.BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Collector.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def collector():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Collector.received.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_requests_and_model_stages_are_exported_as_spans(collector, tmp_path, log_dir):
    config = tmp_path / "hearth.toml"
    config.write_text(
        f'[logging]\notlp_endpoint = "{collector}"\n'
        f'[[models]]\nid = "{EMBED_MODEL}"\nkind = "embedding"\nsource = "{EMBED_MODEL}"\n'
    )
    env = lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir()), OTEL_SERVICE_NAME="hearth-e2e")
    args = lambda port: ["serve", "--config", str(config), "--port", str(port)]
    if "otlp" not in run_cli("--version").stdout.split("features:")[-1]:
        pytest.skip("this hearth binary was built without `--features otlp` (scripts/test builds it with)")
    server = launch("otlp", args, env, log_dir)
    response = httpx.post(f"{server.base_url}/v1/embeddings", json={"model": EMBED_MODEL, "input": ["traced"]})
    assert response.status_code == 200, response.text
    server.stop_gracefully()  # flushes the batch of spans
    traces = [body for path, kind, body in Collector.received if path == "/v1/traces"]
    assert traces, f"nothing reached the collector: {[(p, k) for p, k, _ in Collector.received]}"
    assert all(kind == "application/x-protobuf" for path, kind, _ in Collector.received if path == "/v1/traces")
    payload = b"".join(traces)
    for needle in (b"hearth-e2e", b"request", b"/v1/embeddings", b"preprocess", b"model", EMBED_MODEL.encode()):
        assert needle in payload, f"{needle!r} not in the exported spans"
