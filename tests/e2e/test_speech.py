"""POST /v1/audio/speech and GET /v1/audio/voices through the official openai SDK, on the real Piper
voice en_US-joe-medium (config/offline.toml); the audio is checked with ffprobe (Debian's ffmpeg) and
heard back by the same server's Whisper."""

from __future__ import annotations

import difflib
import json
import re
import subprocess

import openai
import pytest

from conftest import STT_MODEL, TTS_MODEL, assert_error_shape

TEXT = "The backup job finished at half past two. All the snapshots were verified. The next run is tomorrow night."


def words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z' ]", " ", text.lower()).split())


def probe(path) -> dict:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=format_name,duration:stream=codec_name,sample_rate,channels",
         "-of", "json", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)


@pytest.mark.parametrize("fmt,codec", [("mp3", "mp3"), ("opus", "opus"), ("aac", "aac"), ("flac", "flac"), ("wav", "pcm_s16le")])
def test_each_format_is_what_it_says(client, tmp_path, fmt, codec):
    path = tmp_path / f"speech.{fmt}"
    client.audio.speech.create(model=TTS_MODEL, voice="alloy", input=TEXT, response_format=fmt).write_to_file(path)
    info = probe(path)
    stream = info["streams"][0]
    assert stream["codec_name"] == codec and stream["channels"] == 1, info
    # Opus always decodes at 48 kHz; everything else is OpenAI's 24 kHz.
    assert int(stream["sample_rate"]) == (48000 if fmt == "opus" else 24000), info
    if fmt != "opus":  # ffprobe cannot read an Ogg Opus duration without decoding
        assert 4.0 < float(info["format"]["duration"]) < 12.0, info


def test_streaming_response_sends_pcm_sentence_by_sentence(client):
    chunks = []
    with client.audio.speech.with_streaming_response.create(
        model=TTS_MODEL, voice="nova", input=TEXT, response_format="pcm"
    ) as response:
        assert response.headers["content-type"] == "audio/pcm"
        for chunk in response.iter_bytes(chunk_size=None):
            chunks.append(len(chunk))
    total = sum(chunks)
    assert total % 2 == 0 and 4.0 < total / 2 / 24000 < 12.0, chunks
    assert len(chunks) >= 3, f"one chunk per sentence at least: {chunks}"


def test_speech_is_heard_back_by_whisper(client):
    audio = client.audio.speech.create(model=TTS_MODEL, voice="alloy", input=TEXT, response_format="mp3").read()
    heard = client.audio.transcriptions.create(model=STT_MODEL, file=("speech.mp3", audio, "audio/mpeg"), language="en")
    # The voice's own noise varies every rendering, and Whisper may split a compound ("snap shots"):
    # at most two word edits in the nineteen words.
    expected, got = words(TEXT).split(), words(heard.text).split()
    edits = sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in
                difflib.SequenceMatcher(a=expected, b=got).get_opcodes() if tag != "equal")
    assert edits <= 2, heard.text


def test_speed_changes_the_duration(client, tmp_path):
    durations = {}
    for speed in (1.0, 2.0):
        path = tmp_path / f"speed{speed}.wav"
        client.audio.speech.create(model=TTS_MODEL, voice="alloy", input=TEXT, response_format="wav",
                                   speed=speed).write_to_file(path)
        durations[speed] = float(probe(path)["format"]["duration"])
    # Not exactly half: each phoneme's duration is rounded up to whole frames, and the duration
    # predictor's noise (the voice's noise_w) is random; measured 0.58-0.69 over six runs.
    assert 0.4 < durations[2.0] / durations[1.0] < 0.75, durations


def test_bad_requests_are_openai_errors(client, http):
    with pytest.raises(openai.BadRequestError) as unknown_voice:
        client.audio.speech.create(model=TTS_MODEL, voice="nobody", input="Hello.")
    assert unknown_voice.value.body["param"] == "voice"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.audio.speech.create(model=TTS_MODEL, voice="alloy", input="a" * 4097)
    assert too_long.value.body["param"] == "input"
    for body, param in [
        ({"model": TTS_MODEL, "voice": "alloy", "input": ""}, "input"),
        ({"model": TTS_MODEL, "voice": "alloy", "input": "Hi.", "speed": 9}, "speed"),
        ({"model": TTS_MODEL, "voice": "alloy", "input": "Hi.", "response_format": "ogg"}, "response_format"),
    ]:
        assert_error_shape(http.post("/v1/audio/speech", json=body), 400, param=param)


def test_voices_are_listed(http):
    body = http.get("/v1/audio/voices").json()
    voices = {v["id"]: v for v in body["data"]}
    assert voices["en_US-joe-medium"]["model"] == TTS_MODEL
    assert voices["en_US-joe-medium"]["sample_rate"] == 22050
    assert "en_US-joe-medium" in body["voices"]
