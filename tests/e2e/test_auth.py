"""API keys and per-key rate limits through the real binary, driven by the official openai SDK.

The server serves MiniLM (from the offline store) with keys from two places:
  - a keys file, named by HEARTH_API_KEYS_FILE (what systemd's LoadCredential hands over):
    `webui` (premium, 3 requests per minute) and `ingest` (standard, given by its sha256 digest);
  - HEARTH_API_KEY (what a Kubernetes Secret sets), named `env`.
A second server on 0.0.0.0 without keys must warn loudly at startup.
"""

from __future__ import annotations

import hashlib
import json

import openai
import pytest

from conftest import EMBED_MODEL, assert_error_shape, base_env, httpx, launch, models_dir, run_cli

WEBUI_KEY = "hk-e2e-webui-7f3a9c1d5e8b2f4a"
INGEST_KEY = "hk-e2e-ingest-0b9e8d7c6a5f4e3d"
ENV_KEY = "hk-e2e-env-5c4b3a2918273645"
KEYS = (WEBUI_KEY, INGEST_KEY, ENV_KEY)


@pytest.fixture(scope="module")
def keyed_setup(tmp_path_factory, log_dir):
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "api-keys"
    digest = hashlib.sha256(INGEST_KEY.encode()).hexdigest()
    keys_file.write_text(
        "# name  options\n"
        f"{WEBUI_KEY}  webui  class=premium rpm=3\n"
        f"sha256:{digest}  ingest\n"
    )
    config = root / "hearth.toml"
    config.write_text(
        f"""
[[models]]
id = "{EMBED_MODEL}"
kind = "embedding"
source = "{EMBED_MODEL}"
"""
    )
    env = lambda port: base_env(
        HEARTH_MODELS_DIR=str(models_dir()),
        HEARTH_API_KEYS_FILE=str(keys_file),
        HEARTH_API_KEY=ENV_KEY,
    )
    server = launch(
        "keyed",
        lambda port: ["serve", "--config", str(config), "--port", str(port), "--log-format", "json"],
        env,
        log_dir,
    )
    yield {"server": server, "config": config, "keys_file": keys_file, "env": env(0)}
    server.stop_gracefully()


@pytest.fixture(scope="module")
def keyed(keyed_setup):
    return keyed_setup["server"]


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)


def test_each_configured_key_works_through_the_sdk(keyed):
    for key in (INGEST_KEY, ENV_KEY):
        with sdk(keyed, key) as client:
            result = client.embeddings.create(model=EMBED_MODEL, input=["keys work", "from every source"])
            assert len(result.data) == 2 and len(result.data[0].embedding) == 384
            assert [m.id for m in client.models.list().data] == [EMBED_MODEL]


def test_a_wrong_or_missing_key_is_an_authentication_error(keyed):
    with sdk(keyed, "hk-e2e-not-a-key-000000000000") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.embeddings.create(model=EMBED_MODEL, input="x")
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    missing = httpx.post(f"{keyed.base_url}/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"})
    assert_error_shape(missing, 401, param=None, code=None)
    assert missing.headers["www-authenticate"] == "Bearer"
    # The probes answer without a key; /metrics is open by default (for scrapers).
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(f"{keyed.base_url}{path}").status_code == 200, path


def test_requests_per_minute_end_in_a_rate_limit_error_with_openais_headers(keyed):
    with sdk(keyed, WEBUI_KEY) as client:
        for remaining in ("2", "1", "0"):
            raw = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input="one more")
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-remaining-requests"] == remaining
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(model=EMBED_MODEL, input="one too many")
    response = caught.value.response
    assert int(response.headers["retry-after"]) in range(19, 22), "3 per minute refill one every 20 s"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    error = assert_error_shape(response, 429, param=None, code="rate_limit_exceeded", type_="requests")
    assert "`webui`" in error["message"]
    # Another key is not affected.
    with sdk(keyed, ENV_KEY) as client:
        assert client.embeddings.create(model=EMBED_MODEL, input="still fine").data


def test_keys_never_reach_the_log_or_the_metrics(keyed):
    httpx.post(f"{keyed.base_url}/v1/embeddings", headers={"Authorization": "Bearer hk-e2e-leaked-guess-1234567"},
               json={"model": EMBED_MODEL, "input": "x"})
    log = keyed.log()
    metrics = httpx.get(f"{keyed.base_url}/metrics").text
    for key in (*KEYS, "hk-e2e-leaked-guess-1234567"):
        assert key not in log and key not in metrics
    records = keyed.log_lines_json()
    assert any(r.get("message") == "API keys required" for r in records), records[:5]
    assert 'hearth_auth_failures_total{reason="invalid"}' in metrics
    assert 'hearth_rate_limited_total{key="webui",limit="requests"}' in metrics
    assert 'hearth_key_tokens_total{key="ingest"}' in metrics


def test_hearth_check_lists_key_names_never_keys(keyed_setup):
    result = run_cli("check", "--config", str(keyed_setup["config"]), env=keyed_setup["env"])
    assert result.returncode == 0, result.stderr
    assert "api keys: webui (premium), ingest (standard), env (standard)" in result.stdout, result.stdout
    for key in KEYS:
        assert key not in result.stdout + result.stderr
    bad = keyed_setup["keys_file"].with_name("bad-keys")
    bad.write_text("short\n")
    env = {**keyed_setup["env"], "HEARTH_API_KEYS_FILE": str(bad)}
    refused = run_cli("check", "--config", str(keyed_setup["config"]), env=env)
    assert refused.returncode == 2
    assert f"{bad}:1: a key must have at least 16 characters" in refused.stderr, refused.stderr


def test_an_open_server_beyond_loopback_warns_loudly(tmp_path, log_dir):
    config = tmp_path / "open.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\n[[models]]\nid = "m"\nkind = "embedding"\nsource = "{EMBED_MODEL}"\n')
    server = launch(
        "open",
        lambda port: ["serve", "--config", str(config), "--port", str(port), "--log-format", "json"],
        lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir())),
        log_dir,
    )
    try:
        warnings = [json.dumps(r) for r in server.log_lines_json() if r.get("level") == "WARN"]
        assert any("NO API KEYS ARE CONFIGURED" in w for w in warnings), warnings
    finally:
        server.stop_gracefully()
