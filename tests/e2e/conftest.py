"""End-to-end fixtures: start the real `hearth` binary and talk to it over HTTP.

Environment:
  HEARTH_BIN         the binary [default: $CARGO_TARGET_DIR/debug/hearth, else target/debug/hearth]
  HEARTH_MODELS_DIR  the model store holding all-minilm-l6-v2 [default: ~/.cache/hearth/models]
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

try:  # the openai SDK's HTTP client; it is the same API as httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older SDKs use httpx itself
    import httpx  # type: ignore[no-redef]

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"
OFFLINE_CONFIG = REPO_ROOT / "config" / "offline.toml"
EMBED_MODEL = "all-minilm-l6-v2"
# config/offline.toml serves MiniLM's int8 ONNX export: cosine to the float64 reference of the float
# weights is >= 0.99 (0.998 measured, tests/it/real_onnx.rs), not the 0.9999 of the f32 weights.
OFFLINE_EMBED_MIN_COSINE = 0.99
RERANK_MODEL = "all-minilm-l6-v2-rerank"
LLM_MODEL = "smollm2-135m-instruct"
STT_MODEL = "whisper-base"
TTS_MODEL = "piper-joe"
READY_TIMEOUT_S = 120
STOP_TIMEOUT_S = 30

# Every server started by the suite, so a failing test can show their logs.
_SERVERS: list["HearthServer"] = []


def hearth_bin() -> Path:
    if os.environ.get("HEARTH_BIN"):
        return Path(os.environ["HEARTH_BIN"]).resolve()
    target = os.environ.get("CARGO_TARGET_DIR")
    base = Path(target).expanduser() if target else REPO_ROOT / "target"
    return (base / "debug" / "hearth").resolve()


def models_dir() -> Path:
    if os.environ.get("HEARTH_MODELS_DIR"):
        return Path(os.environ["HEARTH_MODELS_DIR"]).expanduser().resolve()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "hearth" / "models"


def pytest_sessionstart(session: pytest.Session) -> None:
    binary = hearth_bin()
    if not (binary.is_file() and os.access(binary, os.X_OK)):
        pytest.exit(
            f"hearth binary not found at {binary}: build it with `cargo build` "
            "(honours CARGO_TARGET_DIR) or point HEARTH_BIN at it",
            returncode=3,
        )
    smollm = models_dir() / LLM_MODEL / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not smollm.is_file():
        pytest.exit(f"SmolLM2 is not installed at {smollm}: run scripts/fetch-models", returncode=3)
    minilm = models_dir() / EMBED_MODEL
    if not (minilm / "model.safetensors").is_file():
        pytest.exit(
            f"all-MiniLM-L6-v2 is not installed at {minilm}: run scripts/fetch-models "
            "or point HEARTH_MODELS_DIR at a store that has it",
            returncode=3,
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any HEARTH_* setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")}
    env.setdefault("RUST_BACKTRACE", "1")  # a panic would show a backtrace, which tests look for
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `hearth ARGS…` to completion from the repository root."""
    return subprocess.run(
        [str(hearth_bin()), *args],
        cwd=REPO_ROOT,
        env=env if env is not None else base_env(HEARTH_MODELS_DIR=str(models_dir())),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class PortTaken(Exception):
    """The chosen port was taken between choosing it and binding it."""


class HearthServer:
    """One `hearth serve` process whose stderr (the log) goes to a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.args = args
        self.env = env
        self.log_path = Path(tempfile.mkstemp(prefix=f"hearth-{name}-", suffix=".log", dir=log_dir)[1])
        self.process: subprocess.Popen | None = None
        self.base_url = ""

    def start(self) -> "HearthServer":
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [str(hearth_bin()), *self.args],
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        _SERVERS.append(self)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 100) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def log_lines_json(self) -> list[dict]:
        """The log parsed as JSON lines; fails on any line that is not JSON."""
        records = []
        for line in self.log().splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pytest.fail(f"{self.name}: log line is not JSON: {line!r}")
        return records

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Waits for GET /ready = 200, learning the address from the server's log."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                if "cannot listen" in self.log():
                    raise PortTaken(self.log())
                pytest.fail(f"hearth ({self.name}) exited with code {code} before it was ready; log:\n{self.log_tail()}")
            if not self.base_url:
                self.base_url = self._address_from_log() or ""
            if self.base_url:
                try:
                    response = httpx.get(f"{self.base_url}/ready", timeout=2)
                    if response.status_code == 200:
                        return
                    last = f"{response.status_code} {response.text}"
                except httpx.TransportError as e:
                    last = repr(e)
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"hearth ({self.name}) not ready after {timeout} s (last /ready: {last}); log:\n{self.log_tail()}")

    def _address_from_log(self) -> str | None:
        """The address from the `listening` line, JSON (`"address":"…"`) or text (`address=…`)."""
        for line in self.log().splitlines():
            if "listening" in line:
                match = re.search(r'"address":"([^"]+)"|address=(\S+)', line)
                if match:
                    return "http://" + (match.group(1) or match.group(2))
        return None

    def stop(self) -> int | None:
        """SIGTERM, then the exit code (None if it had to be killed after STOP_TIMEOUT_S)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return None
        finally:
            if self in _SERVERS:
                _SERVERS.remove(self)

    def stop_gracefully(self) -> None:
        """Stops the server and asserts a clean exit (code 0 within STOP_TIMEOUT_S)."""
        code = self.stop()
        assert code == 0, (
            f"hearth ({self.name}) did not exit 0 within {STOP_TIMEOUT_S} s after SIGTERM "
            f"(code {code}); log:\n{self.log_tail()}"
        )


def launch(name: str, args_for, env_for, log_dir: Path, attempts: int = 3) -> HearthServer:
    """Starts `hearth ARGS` on a free port and waits until it is ready; `args_for(port)` and
    `env_for(port)` give its arguments and environment. Retries if the port is taken meanwhile.
    The log goes to a file in `log_dir` (pytest's temporary directories keep the last runs)."""
    for attempt in range(attempts):
        port = free_port()
        server = HearthServer(name, args_for(port), env_for(port), log_dir).start()
        try:
            server.wait_ready()
            return server
        except PortTaken:
            server.stop()
            if attempt + 1 == attempts:
                pytest.fail(f"hearth ({name}) could not listen on a free port; log:\n{server.log_tail()}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hearth-logs")


@pytest.fixture(scope="session")
def server(log_dir, tmp_path_factory) -> HearthServer:
    """The session's server: config/offline.toml (SmolLM2 chat, Whisper base speech to text, Piper joe text to speech, MiniLM embeddings and bi-encoder rerank, files and vector stores in a fresh data directory)."""
    data_dir = tmp_path_factory.mktemp("hearth-data")
    srv = launch(
        "offline",
        lambda port: ["serve", "--config", str(OFFLINE_CONFIG), "--port", str(port), "--log-format", "json"],
        lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir()), HEARTH_DATA_DIR=str(data_dir)),
        log_dir,
    )
    yield srv
    srv.stop_gracefully()


# The encoder backends the embeddings and rerank suites run against, each through a server of its
# own: the offline config's MiniLM (ONNX Runtime, int8 export) and the same model's float weights on
# candle. The two suites take `base_url`, `http` and `client` from `per_encoder_backend()`, so every
# test in them runs once per backend.
ENCODER_BACKENDS = ["onnx", "candle"]

CANDLE_ENCODER_CONFIG = f"""
[[models]]
id = "{EMBED_MODEL}"
preset = "all-minilm-l6-v2"
source = "all-minilm-l6-v2"
backend = "candle"
cache_mib = 64

[[models]]
id = "{RERANK_MODEL}"
kind = "rerank"
embedding_model = "{EMBED_MODEL}"
"""


def serve_config(name: str, config_text: str, tmp_path_factory, log_dir: Path) -> HearthServer:
    """`hearth serve` on a config file holding `config_text` (in a fresh temporary directory), with
    the offline models directory; ready when it returns."""
    config = tmp_path_factory.mktemp(name) / "hearth.toml"
    config.write_text(config_text)
    return launch(
        name,
        lambda port: ["serve", "--config", str(config), "--port", str(port), "--log-format", "json"],
        lambda port: base_env(HEARTH_MODELS_DIR=str(models_dir())),
        log_dir,
    )


@pytest.fixture(scope="session")
def candle_server(log_dir, tmp_path_factory) -> HearthServer:
    """MiniLM's float weights on candle, under the offline config's ids for it and its reranker."""
    srv = serve_config("candle-encoders", CANDLE_ENCODER_CONFIG, tmp_path_factory, log_dir)
    yield srv
    srv.stop_gracefully()


def per_encoder_backend():
    """Module-scoped `base_url`, `http` and `client` fixtures parametrized over ENCODER_BACKENDS;
    a test module that binds them (`base_url, http, client = per_encoder_backend()`) runs each of
    its tests against every backend."""

    @pytest.fixture(name="base_url", scope="module", params=ENCODER_BACKENDS)
    def backend_base_url(request) -> str:
        name = "server" if request.param == "onnx" else "candle_server"
        return request.getfixturevalue(name).base_url

    @pytest.fixture(name="http", scope="module")
    def backend_http(base_url):
        with httpx.Client(base_url=base_url, timeout=60) as c:
            yield c

    @pytest.fixture(name="client", scope="module")
    def backend_client(base_url):
        import openai

        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
            yield c

    return backend_base_url, backend_http, backend_client


@pytest.fixture(scope="session")
def base_url(server: HearthServer) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def http(base_url: str):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def client(base_url: str):
    import openai

    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads((FIXTURES / "minilm-reference.json").read_text())


def assert_error_shape(response, status: int, *, param: str | None = ..., code: str | None = ..., type_: str | None = None) -> dict:
    """Asserts an OpenAI-shaped error: status, `{"error": {"message", "type", "param", "code"}}`."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    expected_type = type_ or ("server_error" if status >= 500 else "invalid_request_error")
    assert error["type"] == expected_type, error
    if param is not ...:
        assert error["param"] == param, error
    if code is not ...:
        assert error["code"] == code, error
    return error


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for srv in list(_SERVERS):
            report.sections.append((f"hearth log ({srv.name}, last 40 lines)", srv.log_tail(40)))


def pytest_sessionfinish(session, exitstatus):
    # Servers a failed fixture could not stop: never leave a process behind.
    for srv in list(_SERVERS):
        srv.stop()
