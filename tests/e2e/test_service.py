"""Models listing (through the SDK), health, readiness and Prometheus metrics."""

from __future__ import annotations

import re

import openai
import pytest

from conftest import EMBED_MODEL, LLM_MODEL, RERANK_MODEL, STT_MODEL, TTS_MODEL


def test_models_list(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {EMBED_MODEL, RERANK_MODEL, LLM_MODEL, STT_MODEL, TTS_MODEL}
    assert (models[STT_MODEL].kind, models[STT_MODEL].state) == ("stt", "ready")
    assert (models[TTS_MODEL].kind, models[TTS_MODEL].state) == ("tts", "ready")
    embed, rerank, llm = models[EMBED_MODEL], models[RERANK_MODEL], models[LLM_MODEL]
    assert (llm.kind, llm.state) == ("llm", "ready") and llm.max_input_tokens == 8192
    assert embed.object == "model" and embed.owned_by == "hearth" and embed.created > 0
    assert (embed.kind, embed.state) == ("embedding", "ready")
    assert (rerank.kind, rerank.state) == ("rerank", "ready")
    assert embed.dimensions == 384 and embed.max_input_tokens == 256
    assert rerank.scoring == "bi-encoder" and rerank.max_input_tokens == 256


def test_models_retrieve(client):
    model = client.models.retrieve(EMBED_MODEL)
    assert model.id == EMBED_MODEL
    assert model.object == "model"
    assert (model.kind, model.state, model.dimensions) == ("embedding", "ready", 384)


def test_models_retrieve_unknown(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_lists_every_model_ready(http):
    response = http.get("/ready")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert {(m["id"], m["kind"], m["state"]) for m in body["models"]} == {
        (EMBED_MODEL, "embedding", "ready"),
        (RERANK_MODEL, "rerank", "ready"),
        (LLM_MODEL, "llm", "ready"),
        (STT_MODEL, "stt", "ready"),
        (TTS_MODEL, "tts", "ready"),
    }


def counter(text: str, name: str, **labels: str) -> float:
    """The value of the sample of `name` whose labels include `labels` (0 if absent)."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_metrics_are_prometheus_text(http):
    assert http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "count me"}).status_code == 200
    response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE hearth_http_requests_total counter" in text
    assert counter(text, "hearth_http_requests_total", route="/v1/embeddings", model=EMBED_MODEL, status="200") >= 1
    assert "# TYPE hearth_queue_depth gauge" in text
    assert re.search(rf'^hearth_queue_depth\{{model="{re.escape(EMBED_MODEL)}"\}} \d', text, re.M), text
    # every sample line is `name{labels} value` or `name value`
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{.*\})? \S+", line), line


def test_metrics_count_requests_by_status(http):
    def count(status):
        text = http.get("/metrics").text
        return counter(text, "hearth_http_requests_total", route="/v1/embeddings", model=EMBED_MODEL, status=status)

    before_ok, before_bad = count("200"), count("400")
    http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "one"})
    http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "two"})
    http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": [""]})
    assert count("200") == before_ok + 2
    assert count("400") == before_bad + 1
