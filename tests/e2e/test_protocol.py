"""HTTP protocol behaviour over plain HTTP: error shapes, status codes, request ids, JSON logs."""

from __future__ import annotations

import time
import uuid

import pytest

from conftest import EMBED_MODEL, assert_error_shape


def post_raw(http, path, content: bytes, content_type="application/json"):
    return http.post(path, content=content, headers={"content-type": content_type})


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/rerank"])
@pytest.mark.parametrize("body", [b'{"model": "x", "input": ', b"not json", b"", b'{"model": "x"} trailing'])
def test_malformed_json_is_400(http, path, body):
    error = assert_error_shape(post_raw(http, path, body), 400, code=None)
    assert error["param"] is None


def test_json_that_is_not_an_object_is_400(http):
    assert_error_shape(post_raw(http, "/v1/embeddings", b"[1, 2]"), 400)


@pytest.mark.parametrize("input_", [5, None, True, {"text": "hello"}, [None], ["a", 1], [[101], "a"], [1.5]])
def test_wrong_input_type_is_400(http, input_):
    response = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": input_})
    assert_error_shape(response, 400, param="input")


def test_wrong_field_type_names_the_field(http):
    response = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": ["a"], "dimensions": "many"})
    assert_error_shape(response, 400, param="dimensions")
    response = http.post("/v1/rerank", json={"model": "m", "query": "q", "documents": "not a list"})
    assert_error_shape(response, 400, param="documents")


def test_missing_required_field_is_400(http):
    assert_error_shape(http.post("/v1/embeddings", json={"model": EMBED_MODEL}), 400)
    assert_error_shape(http.post("/v1/embeddings", json={"input": ["a"]}), 400)


def test_non_json_content_type_is_415(http):
    response = post_raw(http, "/v1/embeddings", b'{"model": "m", "input": "a"}', content_type="text/plain")
    assert_error_shape(response, 415)


def test_json_with_a_charset_is_read(http):
    body = b'{"model": "%s", "input": "hello", "encoding_format": "float"}' % EMBED_MODEL.encode()
    response = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"])
def test_bodies_a_web_page_can_send_without_preflight_are_415(http, content_type):
    # A form or an untyped fetch() from any web page reaches a local server without a CORS
    # preflight; Hearth reads only JSON-typed bodies, so such a request never reaches a model.
    headers = {} if content_type is None else {"content-type": content_type}
    body = b'{"model": "%s", "input": "hello"}' % EMBED_MODEL.encode()
    error = assert_error_shape(http.post("/v1/embeddings", content=body, headers=headers), 415)
    assert "application/json" in error["message"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "rebound.attacker.test"])
def test_a_rebound_host_name_is_refused_over_the_socket(http, host):
    # DNS rebinding: the browser connects to 127.0.0.1 but names the attacker's host.
    response = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"}, headers={"host": host})
    assert_error_shape(response, 403, code="host_not_allowed")
    preflight = http.options(
        "/v1/embeddings",
        headers={"host": host, "origin": f"http://{host}", "access-control-request-method": "POST"},
    )
    assert preflight.status_code == 403
    assert "access-control-allow-origin" not in preflight.headers


@pytest.mark.parametrize("method, path", [("GET", "/v1/nothing"), ("POST", "/v1/chat/nope"), ("GET", "/")])
def test_unknown_route_is_404(http, method, path):
    error = assert_error_shape(http.request(method, path), 404, code="unknown_url")
    assert path in error["message"]


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/v1/embeddings"), ("DELETE", "/v1/embeddings"), ("GET", "/v1/rerank"), ("POST", "/v1/models"), ("POST", "/health")],
)
def test_wrong_method_is_405(http, method, path):
    response = http.request(method, path)
    assert_error_shape(response, 405, code="method_not_allowed")
    assert "allow" in response.headers


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/health", None),
        ("GET", "/ready", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/nope", None),
        ("POST", "/v1/embeddings", {"model": EMBED_MODEL, "input": "hi"}),
        ("POST", "/v1/embeddings", {"model": EMBED_MODEL, "input": []}),
        ("POST", "/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}),
        ("GET", "/nowhere", None),
        ("PUT", "/v1/embeddings", None),
    ],
)
def test_every_response_has_a_request_id(http, method, path, body):
    response = http.request(method, path, json=body)
    request_id = response.headers.get("x-request-id")
    assert request_id, f"{method} {path} -> {response.status_code} has no x-request-id"
    uuid.UUID(request_id)


def test_request_ids_are_unique(http):
    ids = {http.get("/health").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_client_request_id_is_kept(http):
    response = http.get("/health", headers={"x-request-id": "my-trace-123"})
    assert response.headers["x-request-id"] == "my-trace-123"


def test_logs_are_json_lines_with_the_request_id(server, http):
    response = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "log me"})
    assert response.status_code == 200
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while True:
        records = server.log_lines_json()  # every line must parse
        mine = [r for r in records if (r.get("span") or {}).get("id") == request_id]
        if mine or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert mine, f"no log line carries request id {request_id}"
    finished = [r for r in mine if r.get("status") == 200]
    assert finished, mine
    assert finished[0]["span"]["path"] == "/v1/embeddings" and finished[0]["span"]["method"] == "POST"
    assert all({"timestamp", "level"} <= set(r) for r in records)
    assert any(r.get("message") == "model ready" and r.get("model") == EMBED_MODEL for r in records)
