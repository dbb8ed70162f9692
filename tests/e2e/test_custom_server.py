"""A second server, configured only through HEARTH_* environment variables, serving:

  mymodel          a directory imported with `hearth models pull DIR --as mymodel` (32 dims)
                   (MiniLM is imported the same way, as `minilm`: configs name models inside the
                   models directory, never paths outside it)
  minilm-overload  MiniLM with max_concurrent_requests = 2 and queue_depth = 1
  minilm-truncate  MiniLM with truncate = true and max_inputs_per_request = 4
  org/tiny-embed   the imported directory again, under an id with a slash

with a 64 KiB body limit and CORS for one origin. The last test stops it with SIGTERM while a
request is in flight.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import openai
import pytest

from conftest import (
    EMBED_MODEL,
    FIXTURES,
    assert_error_shape,
    base_env,
    free_port,
    httpx,
    launch,
    models_dir,
    run_cli,
)

BODY_LIMIT = 65536
ORIGIN = "https://app.example.com"
MODELS = {"mymodel", "minilm-overload", "minilm-truncate", "org/tiny-embed"}
TINY = FIXTURES / "models" / "tiny-bert-embed"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A fresh model store holding the tiny model and MiniLM, imported by `hearth models pull DIR`."""
    root = tmp_path_factory.mktemp("store")
    result = run_cli("models", "pull", str(TINY), "--models-dir", str(root), "--as", "mymodel", env=base_env())
    assert result.returncode == 0, f"pull failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    minilm = run_cli("models", "pull", str(models_dir() / EMBED_MODEL), "--models-dir", str(root), "--as", "minilm", env=base_env())
    assert minilm.returncode == 0, f"pull failed ({minilm.returncode}):\n{minilm.stdout}\n{minilm.stderr}"
    return root, result


@pytest.fixture(scope="module")
def setup(store, tmp_path_factory, log_dir):
    root, _ = store
    minilm = "minilm"
    config_port = free_port()
    config = tmp_path_factory.mktemp("config") / "custom.toml"
    # models_dir, host, port and [logging] here are each overridden by a HEARTH_* variable below.
    config.write_text(
        f"""
models_dir = "/nonexistent/hearth-models"

[server]
host = "127.0.0.2"
port = {config_port}
max_request_body_bytes = {BODY_LIMIT}
cors_allowed_origins = ["{ORIGIN}"]

[logging]
format = "text"
level = "debug"

[[models]]
id = "mymodel"
kind = "embedding"
source = "mymodel"

[[models]]
id = "minilm-overload"
kind = "embedding"
source = "{minilm}"
max_concurrent_requests = 2
queue_depth = 1

[[models]]
id = "minilm-truncate"
kind = "embedding"
source = "{minilm}"
truncate = true
max_inputs_per_request = 4

[[models]]
id = "org/tiny-embed"
kind = "embedding"
source = "mymodel"
"""
    )
    env_ports = []

    def env_for(port):
        env_ports.append(port)
        return base_env(
            HEARTH_CONFIG=str(config),
            HEARTH_MODELS_DIR=str(root),
            HEARTH_HOST="127.0.0.1",
            HEARTH_PORT=str(port),
            HEARTH_LOG_FORMAT="json",
            HEARTH_LOG="info,tower_http=warn",
        )

    server = launch("custom", lambda port: ["serve"], env_for, log_dir)
    yield {"server": server, "port": env_ports[-1], "config_port": config_port, "store": root}
    server.stop_gracefully()


@pytest.fixture(scope="module")
def custom(setup):
    return setup["server"]


@pytest.fixture(scope="module")
def http(custom):
    with httpx.Client(base_url=custom.base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def client(custom):
    with openai.OpenAI(base_url=f"{custom.base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def long_inputs(n=64):
    return [
        f"Sentence number {i} talks about rivers, mills, and the quiet town that grew around them over centuries."
        for i in range(n)
    ]


# --- environment variables ------------------------------------------------------------------------


def test_environment_variables_configure_serve(setup, custom):
    """HEARTH_CONFIG, _PORT, _HOST, _MODELS_DIR, _LOG_FORMAT and _LOG all beat the file."""
    assert custom.base_url == f"http://127.0.0.1:{setup['port']}"  # HEARTH_HOST, HEARTH_PORT
    records = custom.log_lines_json()  # HEARTH_LOG_FORMAT=json beats format = "text"
    (listening,) = [r for r in records if r.get("message") == "listening"]
    assert listening["address"] == f"127.0.0.1:{setup['port']}"
    assert listening["models_dir"] == str(setup["store"])  # HEARTH_MODELS_DIR
    assert listening["models"] == len(MODELS)  # HEARTH_CONFIG
    ready = {r["model"] for r in records if r.get("message") == "model ready"}
    assert ready == MODELS
    # HEARTH_LOG=info,tower_http=warn beats level = "debug": no debug lines, no per-request lines
    assert httpx.get(f"{custom.base_url}/health").status_code == 200
    time.sleep(0.2)
    records = custom.log_lines_json()
    assert not [r for r in records if r.get("level") in ("DEBUG", "TRACE")]
    assert not [r for r in records if r.get("target", "").startswith("tower_http")]
    with pytest.raises(httpx.TransportError):  # nothing on the config file's address
        httpx.get(f"http://127.0.0.2:{setup['config_port']}/health", timeout=2)


# --- a model imported with `hearth models pull DIR` -----------------------------------------------


def test_pull_copies_the_directory_into_the_store(store):
    root, result = store
    copied = root / "mymodel"
    for name in ["config.json", "model.safetensors", "tokenizer.json", "modules.json", "1_Pooling/config.json"]:
        assert (copied / name).is_file(), f"{name} was not copied"
        assert (copied / name).read_bytes() == (TINY / name).read_bytes()
    assert str(copied) in result.stdout
    assert not list(root.glob(".*importing*")), "a staging directory was left behind"


def test_pull_refuses_to_overwrite_without_force(store):
    root, _ = store
    again = run_cli("models", "pull", str(TINY), "--models-dir", str(root), "--as", "mymodel", env=base_env())
    assert again.returncode == 1, again
    assert "--force" in again.stderr and "panicked" not in again.stderr


def test_models_list_shows_the_imported_directory(store):
    root, _ = store
    result = run_cli("models", "list", env=base_env(HEARTH_MODELS_DIR=str(root)))
    assert result.returncode == 0, result.stderr
    assert str(root) in result.stdout
    others = result.stdout.split("other directories in the store", 1)
    assert len(others) == 2 and "mymodel" in others[1], result.stdout


def test_pulled_model_serves_embeddings(client):
    reference = json.loads((TINY / "reference.json").read_text())
    cases = reference["cases"]
    response = client.embeddings.create(model="mymodel", input=[c["text"] for c in cases])
    assert response.model == "mymodel"
    assert len(response.data) == len(cases)
    for case, item in zip(cases, response.data):
        vector = np.asarray(item.embedding)
        assert vector.shape == (32,)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        expected = np.asarray(case["pooled"]["mean"])  # mean pooling, then normalised (modules.json)
        cosine = vector @ expected / np.linalg.norm(expected)
        assert cosine > 0.9999, f"{case['text']!r}: cosine {cosine:.6f} to the reference"
    assert client.models.retrieve("mymodel").dimensions == 32


def test_model_id_with_a_slash(client):
    response = client.embeddings.create(model="org/tiny-embed", input=["hello"])
    assert response.model == "org/tiny-embed" and len(response.data[0].embedding) == 32
    model = client.models.retrieve("org/tiny-embed")  # the SDK sends /v1/models/org%2Ftiny-embed
    assert (model.id, model.dimensions) == ("org/tiny-embed", 32)


# --- CORS -----------------------------------------------------------------------------------------


def preflight(http, origin):
    return http.options(
        "/v1/embeddings",
        headers={
            "origin": origin,
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type",
        },
    )


def test_cors_preflight_allows_the_configured_origin(http):
    response = preflight(http, ORIGIN)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "content-type" in response.headers["access-control-allow-headers"].lower()


def test_cors_preflight_from_another_origin_is_not_allowed(http):
    response = preflight(http, "https://evil.example.com")
    assert "access-control-allow-origin" not in response.headers


def test_cors_response_exposes_the_request_id(http):
    response = http.post("/v1/embeddings", json={"model": "mymodel", "input": "hi"}, headers={"origin": ORIGIN})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    assert response.headers.get("x-request-id")


def test_cors_preflight_has_a_request_id(http):
    assert preflight(http, ORIGIN).headers.get("x-request-id"), "a CORS preflight response has no x-request-id"


# --- body limit -----------------------------------------------------------------------------------


def padded_body(size: int) -> bytes:
    """A valid embeddings request of exactly `size` bytes (JSON whitespace as padding)."""
    body = json.dumps({"model": "mymodel", "input": "hello"}).encode()
    assert len(body) < size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_body_at_the_limit_is_accepted(http):
    body = padded_body(BODY_LIMIT)
    assert len(body) == BODY_LIMIT
    response = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text


def test_body_over_the_limit_is_413(http):
    body = padded_body(BODY_LIMIT + 1)
    response = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    error = assert_error_shape(response, 413, param=None, code="request_too_large")
    assert str(BODY_LIMIT) in error["message"]
    assert response.headers.get("x-request-id")


def test_chunked_body_over_the_limit_is_413(http):
    body = padded_body(BODY_LIMIT + 4096)

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        for start in range(0, len(body), 8192):
            yield body[start : start + 8192]

    response = http.post("/v1/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert_error_shape(response, 413, code="request_too_large")


# --- truncation and per-model input limits ---------------------------------------------------------


def test_truncating_model_embeds_the_first_256_tokens(client, reference):
    (case,) = [c for c in reference["cases"] if c["truncated"]]
    response = client.embeddings.create(model="minilm-truncate", input=[case["text"]])
    vector = np.asarray(response.data[0].embedding)
    cosine = vector @ np.asarray(case["embedding"]) / np.linalg.norm(vector)
    assert cosine > 0.9999, f"cosine {cosine:.6f} to the reference of the truncated text"
    assert response.usage.prompt_tokens == reference["max_seq_length"]


def test_max_inputs_per_request(client):
    assert len(client.embeddings.create(model="minilm-truncate", input=["a", "b", "c", "d"]).data) == 4
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm-truncate", input=["a", "b", "c", "d", "e"])
    assert caught.value.param == "input"


# --- overload -------------------------------------------------------------------------------------


async def fire(base_url: str, n: int, body: dict) -> list:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(n)))


def test_overload_is_refused_with_429_and_the_rest_succeed(custom, http):
    body = {"model": "minilm-overload", "input": long_inputs(), "encoding_format": "float"}
    started = time.monotonic()
    responses = asyncio.run(asyncio.wait_for(fire(custom.base_url, 20, body), timeout=120))
    elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    served = [r for r in responses if r.status_code == 200]
    assert refused, f"no request was refused: {statuses}"
    assert served, f"no request was served: {statuses}"
    for response in refused:
        assert int(response.headers["retry-after"]) >= 1
        assert_error_shape(response, 429, param=None, code="model_overloaded", type_="rate_limit_error")
    for response in served:
        assert len(response.json()["data"]) == len(body["input"])
    # a refusal is immediate: the refused requests do not wait for the admitted ones
    assert elapsed < 60
    # the model is usable again once the admitted requests are done
    after = http.post("/v1/embeddings", json={"model": "minilm-overload", "input": ["still here"]})
    assert after.status_code == 200, after.text
    metrics = http.get("/metrics").text
    assert 'hearth_http_requests_total{route="/v1/embeddings",model="minilm-overload",status="429"}' in metrics


def test_overload_is_a_rate_limit_error_in_the_sdk(custom):
    """Through the SDK, a 429 surfaces as openai.RateLimitError."""
    body = {"model": "minilm-overload", "input": long_inputs()}

    async def run():
        async with openai.AsyncOpenAI(
            base_url=f"{custom.base_url}/v1", api_key="unused", max_retries=0, timeout=60
        ) as sdk:
            return await asyncio.gather(
                *(sdk.embeddings.create(**body) for _ in range(8)), return_exceptions=True
            )

    outcomes = asyncio.run(asyncio.wait_for(run(), timeout=120))
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors, "no request was refused"
    assert all(isinstance(e, openai.RateLimitError) for e in errors), errors
    assert all(e.code == "model_overloaded" for e in errors)
    assert len(errors) < len(outcomes)


# --- graceful shutdown (keep last: it stops the module's server) ----------------------------------


def test_sigterm_lets_the_in_flight_request_finish(custom):
    outcome = {}

    def slow_request():
        try:
            outcome["response"] = httpx.post(
                f"{custom.base_url}/v1/embeddings",
                json={"model": "minilm-overload", "input": long_inputs(256)},
                timeout=60,
            )
        except Exception as e:  # noqa: BLE001 - reported below
            outcome["error"] = e

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.3)  # the request is being served (it takes seconds)
    assert "response" not in outcome and "error" not in outcome, "the request finished too early to test"
    custom.stop_gracefully()
    thread.join(timeout=60)
    assert "error" not in outcome, f"the in-flight request failed: {outcome.get('error')!r}"
    response = outcome["response"]
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 256
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{custom.base_url}/health", timeout=2)
