"""The whisper.cpp backend (the binary is built with `--features whisper-cpp`) through the official
openai SDK: a server whose only model is the Q8_0 ggml file scripts/setup writes from Whisper base
(`whisper-base-ggml`), chosen by the folder (no `backend` key), on a LibriVox clip."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
import srt

from conftest import base_env, launch, models_dir

CLIP = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")
EXPECTED = "and mr john dashwood had then leisure to consider how much there might be prudently in his power to do for them"
MODEL = "whisper-cpp"


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def client(tmp_path_factory, log_dir):
    folder = models_dir() / "whisper-base-ggml"
    if not (folder / "ggml-base-q8_0.bin").is_file():
        pytest.fail(f"{folder} is missing: scripts/setup writes it (scripts/convert-whisper-ggml)")
    config = tmp_path_factory.mktemp("whisper-cpp") / "hearth.toml"
    config.write_text(
        f'[[models]]\nid = "{MODEL}"\nkind = "stt"\nsource = "whisper-base-ggml"\nfile = "ggml-base-q8_0.bin"\n'
    )
    server = launch(
        "whisper-cpp",
        lambda port: ["serve", "--config", str(config), "--port", str(port)],
        lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir())),
        log_dir,
    )
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c
    server.stop_gracefully()


def transcribe(client, **kwargs):
    return client.audio.transcriptions.create(model=MODEL, file=("clip.wav", CLIP.read_bytes(), "audio/wav"), **kwargs)


def test_json_text_and_subtitles(client):
    assert words(transcribe(client).text) == EXPECTED
    assert words(transcribe(client, response_format="text")) == EXPECTED
    subtitles = list(srt.parse(transcribe(client, response_format="srt")))
    assert subtitles and words(" ".join(s.content for s in subtitles)) == EXPECTED
    assert transcribe(client, response_format="vtt").startswith("WEBVTT")


def test_verbose_json_segments(client):
    result = transcribe(client, response_format="verbose_json")
    assert result.language == "english" and abs(result.duration - 7.1) < 0.05
    assert all(0 <= s.start <= s.end <= result.duration and s.avg_logprob < 0 for s in result.segments)
    assert words(" ".join(s.text for s in result.segments)) == EXPECTED


def test_translation(client):
    result = client.audio.translations.create(model=MODEL, file=("clip.wav", CLIP.read_bytes(), "audio/wav"))
    assert words(result.text) == EXPECTED


def test_word_timestamps_are_refused_with_a_400(client):
    with pytest.raises(openai.BadRequestError) as error:
        transcribe(client, response_format="verbose_json", timestamp_granularities=["word"])
    assert error.value.param == "timestamp_granularities"
    assert "cannot time words" in error.value.message
