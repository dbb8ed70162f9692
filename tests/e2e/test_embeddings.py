"""POST /v1/embeddings through the official openai SDK against the real MiniLM weights."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest

from conftest import EMBED_MODEL, OFFLINE_EMBED_MIN_COSINE, RERANK_MODEL, assert_error_shape, httpx, per_encoder_backend

# Every test runs against the ONNX Runtime (offline config) and candle servers.
base_url, http, client = per_encoder_backend()

DIMS = 384
TEXTS = [
    "A man is playing a guitar on the stage.",
    "The stock market fell sharply after the announcement.",
    "hello",
    "Photosynthesis converts sunlight into chemical energy in plants.",
]


def as_f32(embedding) -> np.ndarray:
    """A float list, or a base64 string of little-endian f32s, as a float32 array."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def embed(client, inputs, **kwargs) -> np.ndarray:
    response = client.embeddings.create(model=EMBED_MODEL, input=inputs, **kwargs)
    return np.stack([as_f32(d.embedding) for d in response.data])


# --- the three encodings -------------------------------------------------------------------------


def test_sdk_default_requests_base64_and_decodes_it(base_url):
    sent = []

    def remember(request):
        sent.append(json.loads(request.content))

    with httpx.Client(event_hooks={"request": [remember]}, timeout=60) as http_client:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", http_client=http_client, max_retries=0)
        response = client.embeddings.create(model=EMBED_MODEL, input=TEXTS)
    assert sent and sent[0]["encoding_format"] == "base64", sent  # what the SDK asks for by default
    assert len(response.data) == len(TEXTS)
    for item in response.data:
        assert isinstance(item.embedding, list) and len(item.embedding) == DIMS
        assert all(isinstance(x, float) for x in item.embedding)


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_response_shape(client, encoding_format):
    kwargs = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = client.embeddings.create(model=EMBED_MODEL, input=TEXTS, **kwargs)
    assert response.object == "list"
    assert response.model == EMBED_MODEL
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert all(d.object == "embedding" for d in response.data)
    if encoding_format == "base64":
        assert all(isinstance(d.embedding, str) for d in response.data)
    vectors = np.stack([as_f32(d.embedding) for d in response.data])
    assert vectors.shape == (len(TEXTS), DIMS)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_three_encodings_give_identical_vectors(client):
    default = embed(client, TEXTS)
    floats = embed(client, TEXTS, encoding_format="float")
    b64 = embed(client, TEXTS, encoding_format="base64")
    np.testing.assert_array_equal(default, floats)
    np.testing.assert_array_equal(b64, floats)


def test_single_string_input(client):
    response = client.embeddings.create(model=EMBED_MODEL, input="hello", encoding_format="float")
    assert len(response.data) == 1 and response.data[0].index == 0
    assert len(response.data[0].embedding) == DIMS


def test_order_follows_the_input(client):
    together = embed(client, TEXTS, encoding_format="float")
    for i, text in enumerate(TEXTS):
        alone = embed(client, [text], encoding_format="float")[0]
        assert cosine(together[i], alone) > 0.9999, f"data[{i}] is not the embedding of input[{i}]"
    # and reversed input gives reversed output
    backwards = embed(client, TEXTS[::-1], encoding_format="float")
    np.testing.assert_allclose(backwards[::-1], together, atol=1e-5)


# --- correctness against an independent reference ------------------------------------------------


def test_matches_numpy_reference_embeddings(client, reference):
    cases = [c for c in reference["cases"] if not c["truncated"]]
    assert len(cases) >= 5
    response = client.embeddings.create(
        model=EMBED_MODEL, input=[c["text"] for c in cases], encoding_format="float"
    )
    assert len(response.data) == len(cases)
    for case, item in zip(cases, response.data):
        similarity = cosine(item.embedding, case["embedding"])
        assert similarity > OFFLINE_EMBED_MIN_COSINE, f"{case['text']!r}: cosine {similarity:.6f} to the reference"
    # usage counts every token the model read, [CLS] and [SEP] included
    assert response.usage.prompt_tokens == sum(c["n_tokens"] for c in cases)


def test_concurrent_requests_each_get_their_own_embeddings(base_url, reference):
    """Requests batched together by the server (mixed lengths, texts and token ids) stay apart."""
    import asyncio

    cases = reference["cases"]
    requests = []
    for i, case in enumerate(cases):
        if not case["truncated"]:
            requests.append(({"input": [case["text"]]}, [case]))
        requests.append(({"input": [case["input_ids"]]}, [case]))
    mixed = [c for c in cases if not c["truncated"]][:3]
    requests.append(({"input": [c["text"] for c in mixed]}, mixed))

    async def run():
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            return await asyncio.gather(
                *(
                    http.post("/v1/embeddings", json={"model": EMBED_MODEL, "encoding_format": "float", **body})
                    for body, _ in requests
                )
            )

    responses = asyncio.run(asyncio.wait_for(run(), timeout=120))
    for (body, expected), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert len(data) == len(expected)
        for item, case in zip(data, expected):
            similarity = cosine(item["embedding"], case["embedding"])
            assert similarity > OFFLINE_EMBED_MIN_COSINE, f"{case['text'][:40]!r} in a concurrent batch: cosine {similarity:.6f}"


def test_token_id_inputs_match_reference(client, reference):
    """Token-id arrays are embedded as given, up to the model's 256-token limit inclusive."""
    cases = reference["cases"]  # the truncated case's ids are exactly 256 tokens long
    assert any(len(c["input_ids"]) == reference["max_seq_length"] for c in cases)
    response = client.embeddings.create(
        model=EMBED_MODEL, input=[c["input_ids"] for c in cases], encoding_format="float"
    )
    for case, item in zip(cases, response.data):
        similarity = cosine(item.embedding, case["embedding"])
        assert similarity > OFFLINE_EMBED_MIN_COSINE, f"ids of {case['text'][:40]!r}: cosine {similarity:.6f} to the reference"
    assert response.usage.prompt_tokens == sum(len(c["input_ids"]) for c in cases)


def test_input_over_the_token_limit_is_refused(http, reference):
    (case,) = [c for c in reference["cases"] if c["truncated"]]
    response = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": ["short", case["text"]]})
    error = assert_error_shape(response, 400, param="input")
    assert "256" in error["message"], error


def test_paraphrases_are_closer_than_unrelated_sentences(client):
    guitar, performs, password, reset, stocks = embed(
        client,
        [
            "A man is playing a guitar on the stage.",
            "Someone performs music with a guitar in front of an audience",
            "How do I reset my password?",
            "What are the steps to change a forgotten password?",
            "The stock market fell sharply after the announcement.",
        ],
    )
    assert cosine(guitar, performs) > cosine(guitar, password) + 0.3
    assert cosine(password, reset) > cosine(password, stocks) + 0.3
    assert cosine(guitar, performs) > 0.5 and cosine(password, reset) > 0.5


# --- dimensions -----------------------------------------------------------------------------------


def test_dimensions_truncates_and_renormalises(client):
    full = embed(client, TEXTS)
    short = embed(client, TEXTS, dimensions=128)
    assert short.shape == (len(TEXTS), 128)
    np.testing.assert_allclose(np.linalg.norm(short, axis=1), 1.0, atol=1e-5)
    prefix = full[:, :128] / np.linalg.norm(full[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, atol=1e-5)


def test_dimensions_equal_to_the_model_is_the_full_vector(client):
    np.testing.assert_allclose(embed(client, TEXTS, dimensions=DIMS), embed(client, TEXTS), atol=1e-6)


@pytest.mark.parametrize("dimensions", [1000, DIMS + 1, 0])
def test_dimensions_out_of_range_is_refused(http, dimensions):
    response = http.post(
        "/v1/embeddings", json={"model": EMBED_MODEL, "input": ["hello"], "dimensions": dimensions}
    )
    assert_error_shape(response, 400, param="dimensions")


def test_dimensions_out_of_range_through_the_sdk(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED_MODEL, input=["hello"], dimensions=1000)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == "dimensions"


# --- token ids ------------------------------------------------------------------------------------


def test_token_ids_equal_the_text(client):
    # [CLS] hello world [SEP] in MiniLM's uncased WordPiece vocabulary
    ids = embed(client, [[101, 7592, 2088, 102]])
    text = embed(client, ["hello world"])
    assert ids.shape == (1, DIMS)
    assert cosine(ids[0], text[0]) > 0.9999


def test_one_flat_token_id_array_is_one_input(client):
    response = client.embeddings.create(model=EMBED_MODEL, input=[101, 7592, 2088, 102], encoding_format="float")
    assert len(response.data) == 1 and len(response.data[0].embedding) == DIMS
    assert response.usage.prompt_tokens == 4


@pytest.mark.parametrize("input_", [[[101, 30522, 102]], [101, 7592, 30522, 102], [[101, 102], [101, 4294967295, 102]]])
def test_token_id_outside_the_vocabulary_is_refused(http, input_):
    response = http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": input_})
    assert_error_shape(response, 400, param="input", code=None)


def test_largest_token_id_in_the_vocabulary_is_accepted(client):
    assert embed(client, [[101, 30521, 102]]).shape == (1, DIMS)


# --- errors through the SDK -----------------------------------------------------------------------


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model="no-such-model", input=["hello"])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "no-such-model" in caught.value.message


def test_empty_input_list_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED_MODEL, input=[])
    assert caught.value.status_code == 400
    assert caught.value.param == "input"


def test_empty_string_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=EMBED_MODEL, input=["hello", ""])
    assert caught.value.param == "input"


def test_rerank_model_on_embeddings_is_a_kind_mismatch(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=RERANK_MODEL, input=["hello"])
    assert caught.value.status_code == 400
    assert caught.value.code == "model_kind_mismatch"
    assert caught.value.param == "model"


def test_unknown_fields_and_user_are_accepted(client):
    """Clients send fields a server may not know (`extra_body`); they are ignored, as OpenAI does."""
    response = client.embeddings.create(
        model=EMBED_MODEL, input=["hello"], user="user-123", extra_body={"some_future_option": True}
    )
    assert len(response.data) == 1 and len(response.data[0].embedding) == DIMS


def test_unknown_encoding_format_is_refused(http):
    response = http.post(
        "/v1/embeddings", json={"model": EMBED_MODEL, "input": ["hello"], "encoding_format": "int8"}
    )
    assert_error_shape(response, 400, param="encoding_format")


def test_repeated_inputs_are_answered_from_the_cache(http):
    """config/offline.toml gives MiniLM a 64 MiB cache: a repeat is byte-identical and counted as a hit."""

    def hits() -> float:
        total = 0.0
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("hearth_cache_hits_total") and f'model="{EMBED_MODEL}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    body = {"model": EMBED_MODEL, "input": ["a sentence only this test sends", "and a second one"]}
    first = http.post("/v1/embeddings", json=body)
    before = hits()
    second = http.post("/v1/embeddings", json=body)
    assert first.status_code == second.status_code == 200
    assert second.content == first.content
    assert hits() - before == 2
