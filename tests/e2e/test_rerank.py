"""POST /v1/rerank and /rerank over plain HTTP: the Cohere and Jina request shapes."""

from __future__ import annotations

import pytest

from conftest import EMBED_MODEL, RERANK_MODEL, assert_error_shape, per_encoder_backend

# Every test runs against the ONNX Runtime (offline config) and candle servers.
base_url, http, client = per_encoder_backend()

ROUTES = ["/v1/rerank", "/rerank"]
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Bananas are a good source of potassium.",
    "The Great Wall of China is visible from many places.",
    "Paris is the capital and largest city of France.",
    "Rust is a systems programming language focused on safety.",
    "France is a country in Western Europe.",
]
BEST = 2


def rerank(http, route, **body):
    response = http.post(route, json={"model": RERANK_MODEL, "query": QUERY, **body})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return response.json()


def check_ranking(body, n_documents, top_n=None):
    assert body["model"] == RERANK_MODEL
    assert isinstance(body["id"], str) and body["id"]
    results = body["results"]
    assert len(results) == min(top_n or n_documents, n_documents)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True), scores
    indices = [r["index"] for r in results]
    assert len(set(indices)) == len(indices)
    assert all(0 <= i < n_documents for i in indices)
    assert body["usage"]["total_tokens"] > 0
    return results


@pytest.mark.parametrize("route", ROUTES)
def test_cohere_shape_with_top_n_and_documents(http, route):
    body = rerank(http, route, documents=DOCUMENTS, top_n=3, return_documents=True)
    results = check_ranking(body, len(DOCUMENTS), top_n=3)
    assert results[0]["index"] == BEST
    for result in results:  # the returned text is the one at `index` in the request
        assert result["document"] == {"text": DOCUMENTS[result["index"]]}


@pytest.mark.parametrize("route", ROUTES)
def test_jina_shape_with_text_objects(http, route):
    body = rerank(http, route, documents=[{"text": d} for d in DOCUMENTS])
    results = check_ranking(body, len(DOCUMENTS))
    assert results[0]["index"] == BEST
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert all("document" not in r for r in results)  # not asked for


def test_documents_are_not_returned_unless_asked(http):
    for flag in ({}, {"return_documents": False}):
        body = rerank(http, "/v1/rerank", documents=DOCUMENTS, **flag)
        assert all("document" not in r for r in body["results"]), body


def test_indices_follow_request_order(http):
    forwards = rerank(http, "/v1/rerank", documents=DOCUMENTS)["results"]
    backwards = rerank(http, "/v1/rerank", documents=DOCUMENTS[::-1])["results"]
    n = len(DOCUMENTS)
    score_of = {r["index"]: r["relevance_score"] for r in forwards}
    for r in backwards:
        assert r["relevance_score"] == pytest.approx(score_of[n - 1 - r["index"]], abs=1e-5)
    assert backwards[0]["index"] == n - 1 - BEST


def test_top_n_larger_than_documents_returns_all(http):
    body = rerank(http, "/v1/rerank", documents=DOCUMENTS[:2], top_n=10)
    check_ranking(body, 2)


def test_top_n_one(http):
    body = rerank(http, "/rerank", documents=DOCUMENTS, top_n=1, return_documents=True)
    assert body["results"] == [
        {"index": BEST, "relevance_score": body["results"][0]["relevance_score"], "document": {"text": DOCUMENTS[BEST]}}
    ]


def test_usage_grows_with_the_documents(http):
    one = rerank(http, "/v1/rerank", documents=DOCUMENTS[:1])["usage"]
    all_ = rerank(http, "/v1/rerank", documents=DOCUMENTS)["usage"]
    assert 0 < one["total_tokens"] < all_["total_tokens"]


@pytest.mark.parametrize("route", ROUTES)
def test_empty_documents_is_refused(http, route):
    response = http.post(route, json={"model": RERANK_MODEL, "query": QUERY, "documents": []})
    assert_error_shape(response, 400, param="documents")


@pytest.mark.parametrize(
    "change, param",
    [
        ({"query": ""}, "query"),
        ({"top_n": 0}, "top_n"),
        ({"documents": ["ok", 5]}, "documents"),
        ({"documents": [{"title": "no text"}]}, "documents"),
    ],
)
def test_invalid_rerank_requests(http, change, param):
    body = {"model": RERANK_MODEL, "query": QUERY, "documents": DOCUMENTS, **change}
    assert_error_shape(http.post("/v1/rerank", json=body), 400, param=param)


def test_embedding_model_on_rerank_is_a_kind_mismatch(http):
    response = http.post("/v1/rerank", json={"model": EMBED_MODEL, "query": QUERY, "documents": DOCUMENTS})
    assert_error_shape(response, 400, param="model", code="model_kind_mismatch")


def test_unknown_rerank_model(http):
    response = http.post("/rerank", json={"model": "nope", "query": QUERY, "documents": DOCUMENTS})
    assert_error_shape(response, 404, param="model", code="model_not_found")
