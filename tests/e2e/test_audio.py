"""POST /v1/audio/transcriptions and /v1/audio/translations through the official openai SDK,
against the real Whisper base weights (config/offline.toml) and Debian's LibriVox clips."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
import srt
import webvtt

from conftest import STT_MODEL, assert_error_shape
CLIP = Path("/usr/share/pocketsphinx/test/data/librivox/sense_and_sensibility_01_austen_64kb-0870.wav")
EXPECTED = "and mr john dashwood had then leisure to consider how much there might be prudently in his power to do for them"


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def clip() -> bytes:
    if not CLIP.is_file():
        pytest.fail(f"{CLIP} is missing: scripts/setup installs pocketsphinx-testdata")
    return CLIP.read_bytes()


def transcribe(client, clip: bytes, **kwargs):
    return client.audio.transcriptions.create(model=STT_MODEL, file=("clip.wav", clip, "audio/wav"), **kwargs)


def test_json_and_text(client, clip):
    result = transcribe(client, clip)
    assert words(result.text) == EXPECTED
    text = transcribe(client, clip, response_format="text")
    assert isinstance(text, str) and words(text) == EXPECTED


def test_verbose_json_segments_are_ordered_and_inside_the_audio(client, clip):
    result = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["segment"])
    assert result.language == "english"
    assert abs(result.duration - 7.1) < 0.05
    assert words(result.text) == EXPECTED
    last = 0.0
    for segment in result.segments:
        assert last <= segment.start <= segment.end <= result.duration
        assert segment.tokens and segment.avg_logprob < 0 and 0 <= segment.no_speech_prob <= 1
        last = segment.end
    assert words(" ".join(s.text for s in result.segments)) == EXPECTED


def test_srt_and_vtt_parse_with_real_parsers(client, clip, tmp_path):
    subtitles = list(srt.parse(transcribe(client, clip, response_format="srt")))
    assert subtitles and words(" ".join(s.content for s in subtitles)) == EXPECTED
    assert all(s.start <= s.end for s in subtitles)
    vtt_file = tmp_path / "clip.vtt"
    vtt_file.write_text(transcribe(client, clip, response_format="vtt"))
    captions = webvtt.read(str(vtt_file))
    assert len(captions) == len(subtitles)
    assert words(" ".join(c.text for c in captions)) == EXPECTED


def test_streamed_deltas_add_up_to_the_text(client, clip):
    events = list(transcribe(client, clip, stream=True))
    assert events[-1].type == "transcript.text.done"
    deltas = [e.delta for e in events[:-1]]
    assert all(e.type == "transcript.text.delta" for e in events[:-1]) and deltas
    assert "".join(deltas) == events[-1].text
    assert words(events[-1].text) == EXPECTED


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks translations deprecated
def test_translation_of_english_speech(client, clip):
    result = client.audio.translations.create(model=STT_MODEL, file=("clip.wav", clip, "audio/wav"))
    assert words(result.text) == EXPECTED
    verbose = client.audio.translations.create(
        model=STT_MODEL, file=("clip.wav", clip, "audio/wav"), response_format="verbose_json"
    )
    assert verbose.task == "translate" and words(verbose.text) == EXPECTED


@pytest.mark.parametrize(
    "name, data, code",
    [
        ("empty.wav", b"", "empty_audio"),
        ("notes.txt", b"not audio, just some text in a file", "unsupported_audio_format"),
        ("half.wav", None, "truncated_audio"),
    ],
)
def test_bad_audio_gets_a_400_naming_the_problem(client, clip, name, data, code):
    data = clip[: len(clip) // 2] if data is None else data
    with pytest.raises(openai.BadRequestError) as raised:
        client.audio.transcriptions.create(model=STT_MODEL, file=(name, data))
    assert raised.value.code == code
    assert raised.value.param == "file"


def test_a_json_body_is_refused_with_415(http):
    response = http.post("/v1/audio/transcriptions", json={"model": STT_MODEL, "file": "x"})
    assert_error_shape(response, 415, param=None, code=None)
    assert "multipart/form-data" in response.json()["error"]["message"]


def test_word_timestamps_are_monotonic_and_inside_the_audio(client, clip):
    result = transcribe(client, clip, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert words(" ".join(w.word for w in result.words)) == EXPECTED
    last = 0.0
    for word in result.words:
        assert last <= word.start <= word.end <= result.duration
        last = word.end
    assert result.segments and result.words[-1].end > result.duration / 2
