"""POST /v1/chat/completions and /v1/completions through the official openai SDK, against the real
SmolLM2-135M-Instruct Q4_1 GGUF served by config/offline.toml."""

from __future__ import annotations

import openai
import pytest

from conftest import LLM_MODEL as LLM
from conftest import assert_error_shape

QUESTION = [{"role": "user", "content": "What is the opposite of hot?"}]


def greedy_chat(client, **kwargs):
    return client.chat.completions.create(model=LLM, messages=QUESTION, temperature=0, **kwargs)


# --- chat ----------------------------------------------------------------------------------------


def test_chat_plain_answer_has_openais_shape(client):
    response = greedy_chat(client, max_tokens=24)
    assert response.id.startswith("chatcmpl-")
    assert response.object == "chat.completion"
    assert response.model == LLM
    assert isinstance(response.created, int)
    assert response.system_fingerprint and response.system_fingerprint.startswith("fp_")
    (choice,) = response.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "cold" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 10
    assert 0 < usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streamed_with_usage_matches_the_plain_answer(client):
    plain = greedy_chat(client, max_tokens=24)
    chunks = list(greedy_chat(client, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert "\ufffd" not in text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    # include_usage: one last chunk with no choices and the usage; none before it has usage.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_chat_stream_ends_with_done(http):
    body = {"model": LLM, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 3


def test_chat_n_two_with_a_seed_is_reproducible(client):
    kwargs = dict(model=LLM, messages=QUESTION, n=2, temperature=1.0, seed=11, max_tokens=16)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage.completion_tokens >= 2


def test_chat_n_two_streamed_interleaves_both_choices(client):
    chunks = list(
        client.chat.completions.create(model=LLM, messages=QUESTION, n=2, seed=3, max_tokens=8, stream=True)
    )
    indexes = {c.choices[0].index for c in chunks if c.choices}
    assert indexes == {0, 1}
    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_chat_max_tokens_ends_with_length(client):
    response = greedy_chat(client, max_completion_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


def test_chat_stop_string_is_not_emitted(client):
    full = greedy_chat(client, max_tokens=24).choices[0].message.content
    stop = full.split()[3]  # a word from the middle of the answer
    response = greedy_chat(client, max_tokens=24, stop=[stop, "never-appears"])
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == full[: full.index(stop)]


def test_chat_content_parts_and_ignored_fields(client):
    response = client.chat.completions.create(
        model=LLM,
        messages=[
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "text", "text": "What is the opposite of "}, {"type": "text", "text": "hot?"}]},
        ],
        temperature=0,
        max_tokens=8,
        user="someone",
        store=False,
        metadata={"k": "v"},
    )
    assert response.choices[0].message.content


# --- completions ---------------------------------------------------------------------------------


def test_completions_plain_list_and_token_prompts(client):
    one = client.completions.create(model=LLM, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert one.object == "text_completion" and one.id.startswith("cmpl-")
    assert one.choices[0].index == 0 and one.choices[0].text
    both = client.completions.create(model=LLM, prompt=["Once upon a time", "The sky is"], max_tokens=8, temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == one.choices[0].text
    assert both.usage.prompt_tokens > one.usage.prompt_tokens
    # The same prompt as token ids gives the same text.
    ids = client.completions.create(model=LLM, prompt="Once upon a time", max_tokens=1, temperature=0, echo=True)
    assert ids.choices[0].text.startswith("Once upon a time")


def test_completions_streamed(client):
    plain = client.completions.create(model=LLM, prompt="The three laws of thermodynamics are", max_tokens=12, temperature=0)
    chunks = list(
        client.completions.create(
            model=LLM, prompt="The three laws of thermodynamics are", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"messages": QUESTION, "frobnicate": 1}, 400, "frobnicate", "unsupported_parameter"),
        ({"messages": QUESTION, "temperature": 3}, 400, "temperature", ...),
        ({"messages": QUESTION, "top_p": 0}, 400, "top_p", ...),
        ({"messages": QUESTION, "n": 0}, 400, "n", ...),
        ({"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens", ...),
        ({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", ...),
        ({"messages": []}, 400, "messages", ...),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, ..., ...),
        ({"messages": QUESTION, "model": "no-such-model"}, 404, "model", "model_not_found"),
        ({"messages": QUESTION, "model": "all-minilm-l6-v2"}, 400, "model", ...),
    ],
)
def test_chat_errors(http, body, status, param, code):
    body = {"model": LLM, **body}
    assert_error_shape(http.post("/v1/chat/completions", json=body), status, param=param, code=code)


def test_a_prompt_longer_than_the_context_names_both_lengths(http):
    response = http.post("/v1/completions", json={"model": LLM, "prompt": [1] * 9000, "max_tokens": 4})
    error = assert_error_shape(response, 400, code="context_length_exceeded")
    assert "9000" in error["message"] and "8192" in error["message"], error


def test_completions_suffix_is_refused(http):
    response = http.post("/v1/completions", json={"model": LLM, "prompt": "x", "suffix": "y"})
    assert_error_shape(response, 400, param="suffix")


def test_sdk_raises_on_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LLM, messages=QUESTION, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
