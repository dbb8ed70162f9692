"""Model lifecycle through the real binary: MiniLM configured to load on its first request and to
unload one second after its last (`preload = false`, `keep_alive = 0`), and the admin endpoints
(an admin key and a plain one)."""

from __future__ import annotations

import time

import openai
import pytest

from conftest import EMBED_MODEL, assert_error_shape, base_env, httpx, launch, models_dir, serve_config

ADMIN_KEY = "hk-e2e-admin-6e5d4c3b2a190817"
USER_KEY = "hk-e2e-user-1a2b3c4d5e6f7a8b"


@pytest.fixture(scope="module")
def lazy(tmp_path_factory, log_dir):
    server = serve_config(
        "lifecycle",
        f"""
[[auth.keys]]
name = "ops"
key = "{ADMIN_KEY}"
admin = true

[[auth.keys]]
name = "app"
key = "{USER_KEY}"

[[models]]
id = "{EMBED_MODEL}"
kind = "embedding"
source = "{EMBED_MODEL}"
preload = false
keep_alive = 0
""",
        tmp_path_factory,
        log_dir,
    )
    yield server
    server.stop_gracefully()


def state(server, key=USER_KEY) -> str:
    response = httpx.get(f"{server.base_url}/v1/models/{EMBED_MODEL}", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response.json()["state"]


def wait_for(server, wanted: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while state(server) != wanted:
        assert time.monotonic() < deadline, f"the model never became {wanted}"
        time.sleep(0.1)


def test_loaded_on_first_use_then_unloaded_when_idle(lazy):
    assert state(lazy) == "unloaded"
    assert httpx.get(f"{lazy.base_url}/ready").status_code == 200
    with openai.OpenAI(base_url=f"{lazy.base_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120) as client:
        result = client.embeddings.create(model=EMBED_MODEL, input=["loaded for this request"])
        assert len(result.data[0].embedding) == 384
        wait_for(lazy, "unloaded")
        again = client.embeddings.create(model=EMBED_MODEL, input=["and again"])
        assert len(again.data[0].embedding) == 384
    metrics = httpx.get(f"{lazy.base_url}/metrics").text
    assert f'hearth_model_loads_total{{model="{EMBED_MODEL}",trigger="request"}} 2' in metrics, metrics
    assert f'hearth_model_unloads_total{{model="{EMBED_MODEL}",trigger="idle"}}' in metrics


def test_admin_endpoints_need_an_admin_key(lazy):
    url = f"{lazy.base_url}/admin/models/{EMBED_MODEL}"
    refused = httpx.post(f"{url}/load", headers={"Authorization": f"Bearer {USER_KEY}"})
    assert_error_shape(refused, 403, param=None, code="admin_key_required")
    loaded = httpx.post(f"{url}/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["state"] == "ready" and loaded.json()["dimensions"] == 384
    unloaded = httpx.post(f"{url}/unload", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
    assert unloaded.json()["state"] == "unloaded", unloaded.text


def test_sighup_reloads_models_and_keys(tmp_path, log_dir):
    import signal

    config = tmp_path / "hearth.toml"
    model = f'[[models]]\nid = "{EMBED_MODEL}"\nkind = "embedding"\nsource = "{EMBED_MODEL}"\n'
    config.write_text(f'[[auth.keys]]\nname = "ops"\nkey = "{ADMIN_KEY}"\n{model}')
    server = launch(
        "sighup",
        lambda port: ["serve", "--config", str(config), "--port", str(port), "--log-format", "json"],
        lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir())),
        log_dir,
    )
    try:
        models = lambda key: httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models(USER_KEY).status_code == 401
        config.write_text(
            f'[[auth.keys]]\nname = "ops"\nkey = "{ADMIN_KEY}"\n[[auth.keys]]\nname = "app"\nkey = "{USER_KEY}"\n'
            f'{model}[[models]]\nid = "second"\nkind = "embedding"\nsource = "{EMBED_MODEL}"\npreload = false\n'
        )
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while models(USER_KEY).status_code != 200:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        assert [m["id"] for m in models(USER_KEY).json()["data"]] == [EMBED_MODEL, "second"]
        with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120) as client:
            assert len(client.embeddings.create(model="second", input="loaded after a reload").data[0].embedding) == 384
        # A broken config is refused and nothing changes.
        config.write_text("[[models]]\nid = 3\n")
        server.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "the config was not reloaded" not in server.log():
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.1)
        assert [m["id"] for m in models(USER_KEY).json()["data"]] == [EMBED_MODEL, "second"]
    finally:
        server.stop_gracefully()


def test_sigterm_lets_a_stream_in_flight_finish_then_exits_0(tmp_path, log_dir):
    """The drain covers streams: a chat stream started before SIGTERM runs to its end."""
    import signal

    from conftest import LLM_MODEL

    config = tmp_path / "hearth.toml"
    config.write_text(f'[[models]]\nid = "{LLM_MODEL}"\npreset = "{LLM_MODEL}"\nsource = "{LLM_MODEL}"\n')
    server = launch(
        "drain",
        lambda port: ["serve", "--config", str(config), "--port", str(port)],
        lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir())),
        log_dir,
    )
    body = {"model": LLM_MODEL, "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            "max_tokens": 120, "temperature": 0, "stream": True}
    lines = []
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        stream = response.iter_lines()
        for line in stream:
            if line.startswith("data: "):
                lines.append(line)
                break
        server.process.send_signal(signal.SIGTERM)  # while the stream has most of its tokens to go
        lines.extend(line for line in stream if line.startswith("data: "))
    assert lines[-1] == "data: [DONE]", lines[-3:]
    # All 120 tokens came, most of them after SIGTERM: the stream was not cut short.
    assert '"finish_reason":"length"' in lines[-2], lines[-2]
    assert len(lines) >= 100, f"the stream was cut short: {len(lines)} events"
    assert server.process.wait(timeout=60) == 0, server.log_tail()
