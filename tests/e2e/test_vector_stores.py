"""Files, vector stores, search and grounded chat, driven by the official `openai` SDK against
config/offline.toml (MiniLM embeddings, BM25, the MiniLM bi-encoder reranker, SmolLM2)."""

from __future__ import annotations

import io

import openai
import pytest

from conftest import LLM_MODEL, assert_error_shape

DOCS = {
    "kernel.md": "# The scheduler\nThe completely fair scheduler picks the runnable task with the least virtual runtime.",
    "garden.html": "<html><body><h1>Tomatoes</h1><p>Tomato plants want full sun, deep watering and support stakes.</p></body></html>",
    "coffee.txt": "An espresso machine forces hot water through finely ground coffee at nine bars of pressure.",
}


def upload(client, name: str, text: str):
    return client.files.create(file=(name, io.BytesIO(text.encode()), "application/octet-stream"), purpose="assistants")


@pytest.fixture(scope="module")
def store(client):
    files = {name: upload(client, name, text) for name, text in DOCS.items()}
    vs = client.vector_stores.create(name="e2e", metadata={"suite": "e2e"})
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, file_ids=[f.id for f in files.values()]
    )
    assert batch.status == "completed", batch
    assert batch.file_counts.completed == len(DOCS)
    return vs, files


def test_files_round_trip(client):
    created = upload(client, "notes.txt", "hello files")
    assert created.object == "file" and created.bytes == len("hello files") and created.purpose == "assistants"
    assert client.files.retrieve(created.id).filename == "notes.txt"
    assert client.files.content(created.id).read() == b"hello files"
    assert created.id in [f.id for f in client.files.list(purpose="assistants")]
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_store_counts_and_files(client, store):
    vs, files = store
    got = client.vector_stores.retrieve(vs.id)
    assert got.file_counts.completed == len(DOCS) and got.file_counts.total == len(DOCS)
    assert got.status == "completed" and got.metadata == {"suite": "e2e"}
    listed = client.vector_stores.files.list(vector_store_id=vs.id)
    assert sorted(f.id for f in listed) == sorted(f.id for f in files.values())
    assert all(f.status == "completed" and f.chunking_strategy.type == "static" for f in listed)
    assert vs.id in [s.id for s in client.vector_stores.list()]


@pytest.mark.parametrize(
    "query,expected",
    [
        ("how does the CPU scheduler choose a task", "kernel.md"),
        ("growing tomatoes in the sun", "garden.html"),
        ("how is espresso made", "coffee.txt"),
    ],
)
def test_search_finds_the_right_document(client, store, query, expected):
    vs, _ = store
    results = list(client.vector_stores.search(vector_store_id=vs.id, query=query, max_num_results=3))
    assert results, query
    assert results[0].filename == expected, [(r.filename, r.score) for r in results]
    assert results[0].content[0].type == "text" and results[0].content[0].text
    scores = [r.score for r in results]
    assert scores == sorted(scores, reverse=True)


def test_attributes_filter_the_search(client, store):
    vs, files = store
    client.vector_stores.files.update(vector_store_id=vs.id, file_id=files["coffee.txt"].id, attributes={"kind": "drink"})
    results = list(
        client.vector_stores.search(
            vector_store_id=vs.id,
            query="scheduler",
            filters={"type": "eq", "key": "kind", "value": "drink"},
        )
    )
    assert results and all(r.filename == "coffee.txt" for r in results)


def test_grounded_chat_cites_its_sources(client, store):
    vs, files = store
    reply = client.chat.completions.create(
        model=LLM_MODEL,
        messages=[{"role": "user", "content": "What pressure does an espresso machine use?"}],
        max_tokens=24,
        temperature=0,
        extra_body={"rag": {"vector_store_ids": [vs.id], "top_k": 3, "rerank_top_k": 2}},
    )
    sources = reply.model_extra["rag"]["sources"]
    assert len(sources) == 2
    assert sources[0]["file_id"] == files["coffee.txt"].id and sources[0]["marker"] == 1
    assert reply.choices[0].message.content
    # The sources went into the prompt: the prompt is longer than without them.
    plain = client.chat.completions.create(
        model=LLM_MODEL,
        messages=[{"role": "user", "content": "What pressure does an espresso machine use?"}],
        max_tokens=1,
    )
    assert reply.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_unknown_store_and_bad_input(client, http, store):
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve("vs_missing")
    vs, _ = store
    assert_error_shape(http.post(f"/v1/vector_stores/{vs.id}/search", json={"query": ""}), 400, param="query", code=None)
    response = http.post(
        "/v1/chat/completions",
        json={"model": LLM_MODEL, "messages": [{"role": "user", "content": "x"}], "rag": {"vector_store_ids": ["vs_missing"]}},
    )
    assert_error_shape(response, 404, param="vector_store_id", code="not_found")


def test_deleting_a_store(client):
    vs = client.vector_stores.create(name="temporary")
    assert client.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(vs.id)
