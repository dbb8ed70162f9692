"""The command line: `hearth check`, `hearth serve` with bad input, `hearth models list|pull`,
exit codes (0 ok, 1 runtime failure, 2 bad usage or configuration) and HEARTH_* variables."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from conftest import EMBED_MODEL, OFFLINE_CONFIG, REPO_ROOT, RERANK_MODEL, base_env, hearth_bin, models_dir, run_cli

PRESETS = [
    "all-minilm-l6-v2",
    "bge-small-en-v1.5",
    "bge-base-en-v1.5",
    "bge-large-en-v1.5",
    "bge-m3",
    "bge-reranker-base",
    "bge-reranker-v2-m3",
    "ms-marco-minilm-l6-v2",
]
MODEL = '[[models]]\nid = "a"\nkind = "embedding"\nsource = "x"\n'


def offline_env(**extra) -> dict[str, str]:
    """No hub access: offline switch on, and any HTTP(S) connection goes to a closed local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    return base_env(
        HF_HUB_OFFLINE="1", HTTPS_PROXY=closed, https_proxy=closed, HTTP_PROXY=closed, http_proxy=closed, **extra
    )


def assert_clean_failure(result: subprocess.CompletedProcess, code: int) -> None:
    """Exit `code` with an `error: …` message, and no panic or backtrace."""
    assert result.returncode == code, f"exit {result.returncode}, wanted {code}:\n{result.stdout}\n{result.stderr}"
    assert result.stderr.startswith("error:"), result.stderr
    for sign in ("panicked", "stack backtrace", "RUST_BACKTRACE"):
        assert sign not in result.stderr, result.stderr


# --- hearth check ---------------------------------------------------------------------------------


def test_check_accepts_the_offline_config():
    result = run_cli("check", "--config", str(OFFLINE_CONFIG))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout
    assert EMBED_MODEL in result.stdout and RERANK_MODEL in result.stdout
    assert f"models dir {models_dir()}" in result.stdout


def test_check_accepts_the_default_config():
    result = run_cli("check", "--config", str(REPO_ROOT / "config" / "hearth.toml"))
    assert result.returncode == 0, result.stderr
    assert "bge-small-en-v1.5" in result.stdout and "bge-reranker-base" in result.stdout


BAD_CONFIGS = {
    "pooling": (MODEL + 'pooling = "avg"\n', ["models[0].pooling", "avg"]),
    "dtype": (MODEL + 'dtype = "f64"\n', ["models[0].dtype"]),
    "wrong-type": (MODEL + 'normalize = "yes"\n', ["models[0].normalize"]),
    "unknown-model-key": (MODEL + "bogus = 1\n", ["models[0]", "bogus"]),
    "unknown-server-key": ("[server]\nprot = 1\n", ["prot"]),
    "unknown-top-level-key": ('modeldir = "/x"\n', ["modeldir"]),
    "missing-id": ('[[models]]\nkind = "embedding"\nsource = "x"\n', ["models[0].id"]),
    "missing-kind": ('[[models]]\nid = "a"\nsource = "x"\n', ["models[0].kind"]),
    "missing-source": ('[[models]]\nid = "a"\nkind = "embedding"\n', ["models[0].source"]),
    "duplicate-id": (MODEL + MODEL, ["models[1].id"]),
    "zero-queue": (MODEL + "queue_depth = 0\n", ["models[0].queue_depth"]),
    "zero-body-limit": ("[server]\nmax_request_body_bytes = 0\n", ["server.max_request_body_bytes"]),
    "unknown-preset": ('[[models]]\nid = "a"\npreset = "nope"\n', ["models[0].preset", "bge-small-en-v1.5"]),
    "unknown-kind": ('[[models]]\nid = "a"\nkind = "vision"\nsource = "x"\n', ["models[0].kind"]),
    "tts-voices-outside": ('[[models]]\nid = "a"\nkind = "tts"\nsource = "x"\nvoices_dir = "/etc"\n', ["models[0].voices_dir"]),
    "zero-audio-length": ('[[models]]\nid = "a"\nkind = "stt"\nsource = "x"\nmax_audio_secs = 0\n', ["models[0].max_audio_secs"]),
    "bad-hub-source": ('[[models]]\nid = "a"\nkind = "embedding"\nsource = "hf:onlyname"\n', ["models[0].source"]),
    "scoring-on-embedding": (MODEL + 'scoring = "bi-encoder"\n', ["models[0].scoring"]),
    "bad-id": ('[[models]]\nid = "a b"\nkind = "embedding"\nsource = "x"\n', ["models[0].id"]),
    "bad-origin": ('[server]\ncors_allowed_origins = ["example.com"]\n', ["server.cors_allowed_origins"]),
    "bad-device": (MODEL + 'device = "tpu"\n', ["models[0].device"]),
    "invalid-toml": ("[[models]\n", ["TOML"]),
}


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_check_rejects_a_bad_config_naming_the_field(tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    config = tmp_path / f"{name}.toml"
    config.write_text(text)
    result = run_cli("check", "--config", str(config))
    assert_clean_failure(result, 2)
    assert str(config) in result.stderr, result.stderr
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} not in: {result.stderr}"


def test_check_missing_file_is_exit_2(tmp_path):
    missing = tmp_path / "nope.toml"
    result = run_cli("check", "--config", str(missing))
    assert_clean_failure(result, 2)
    assert str(missing) in result.stderr


# --- hearth serve with bad input ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pooling", "unknown-model-key", "missing-id"])
def test_serve_with_a_bad_config_exits_2(tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_cli("serve", "--config", str(config), "--port", "0", timeout=30)
    assert_clean_failure(result, 2)
    assert expected[0] in result.stderr


@pytest.mark.parametrize(
    "variable, value",
    [("HEARTH_PORT", "not-a-port"), ("HEARTH_LOG_FORMAT", "xml"), ("HEARTH_LOG", "[[[")],
)
def test_serve_with_a_bad_environment_variable_exits_2(variable, value):
    env = base_env(HEARTH_CONFIG=str(OFFLINE_CONFIG), HEARTH_MODELS_DIR=str(models_dir()), **{variable: value})
    result = run_cli("serve", env=env, timeout=30)
    assert result.returncode == 2, result
    assert value in result.stderr
    assert "panicked" not in result.stderr


def test_serve_on_a_taken_port_exits_1():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run_cli("serve", "--config", str(OFFLINE_CONFIG), "--port", str(port), timeout=30)
    assert result.returncode == 1, result
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "panicked" not in result.stderr


def test_unknown_subcommand_is_exit_2():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "frobnicate" in result.stderr


# --- environment variables for check --------------------------------------------------------------


def test_check_reads_hearth_config_and_models_dir(tmp_path):
    env = base_env(HEARTH_CONFIG=str(OFFLINE_CONFIG), HEARTH_MODELS_DIR=str(tmp_path))
    result = run_cli("check", env=env)
    assert result.returncode == 0, result.stderr
    assert str(OFFLINE_CONFIG) in result.stdout
    assert f"models dir {tmp_path}" in result.stdout
    assert f"{tmp_path}/all-minilm-l6-v2" in result.stdout  # relative sources resolve inside it


def test_flags_beat_environment_variables(tmp_path):
    env = base_env(HEARTH_CONFIG=str(tmp_path / "missing.toml"), HEARTH_MODELS_DIR=str(tmp_path))
    result = run_cli("check", "--config", str(OFFLINE_CONFIG), "--models-dir", str(models_dir()), env=env)
    assert result.returncode == 0, result.stderr
    assert f"models dir {models_dir()}" in result.stdout


# --- hearth models list / pull --------------------------------------------------------------------


def test_models_list_prints_the_presets_offline(tmp_path):
    started = time.monotonic()
    result = run_cli("models", "list", "--models-dir", str(tmp_path), env=offline_env(), timeout=30)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 20
    assert str(tmp_path) in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[2:] if line.strip()}
    for preset in PRESETS:
        assert preset in rows, f"{preset} missing from:\n{result.stdout}"
    assert rows["bge-small-en-v1.5"][1] == "embedding"
    assert rows["bge-reranker-base"][1] == "rerank"


def test_models_list_marks_installed_models():
    result = run_cli("models", "list", env=offline_env(HEARTH_MODELS_DIR=str(models_dir())))
    assert result.returncode == 0, result.stderr
    (row,) = [line.split() for line in result.stdout.splitlines() if line.startswith("all-minilm-l6-v2 ")]
    assert row[3] == "local", row  # PRESET KIND SIZE STATE SOURCE


def test_models_pull_from_the_hub_offline_fails_readably(tmp_path):
    result = run_cli("models", "pull", "hf:org/name", "--models-dir", str(tmp_path), env=offline_env(), timeout=60)
    assert_clean_failure(result, 1)
    assert "hf:org/name" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr, f"the offline switch is not mentioned: {result.stderr}"


def test_models_pull_from_the_hub_without_network_fails_readably(tmp_path):
    env = {k: v for k, v in offline_env().items() if k != "HF_HUB_OFFLINE"}
    result = run_cli("models", "pull", "hf:org/name", "--models-dir", str(tmp_path), env=env, timeout=60)
    assert_clean_failure(result, 1)
    assert "hf:org/name" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr
    assert not any(tmp_path.rglob("*.safetensors"))


def test_models_pull_unknown_name_lists_presets(tmp_path):
    result = run_cli("models", "pull", "no-such-thing", "--models-dir", str(tmp_path), env=offline_env())
    assert_clean_failure(result, 1)
    assert "no-such-thing" in result.stderr and "bge-small-en-v1.5" in result.stderr


def test_version():
    result = subprocess.run([str(hearth_bin()), "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("hearth ")
