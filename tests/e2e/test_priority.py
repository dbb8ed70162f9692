"""Priority classes through the real binary: a premium key's request overtakes standard requests
queued before it (it counts as two seconds older), so it is answered before most of them, where
first-come-first-served would answer it last. Load shedding is off here so that nothing is refused."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import EMBED_MODEL, httpx, serve_config

PREMIUM_KEY = "hk-e2e-premium-9f8e7d6c5b4a3921"
STANDARD_KEY = "hk-e2e-standard-1029384756abcdef"
STANDARD_REQUESTS = 16
SENTENCES = [f"Sentence {i} about the mill, the river and the town that grew around them." for i in range(32)]


@pytest.fixture(scope="module")
def classed(tmp_path_factory, log_dir):
    server = serve_config(
        "priority",
        f"""
[server]
max_queue_wait_ms = 0

[[auth.keys]]
name = "premium"
key = "{PREMIUM_KEY}"
class = "premium"

[[auth.keys]]
name = "standard"
key = "{STANDARD_KEY}"

[[models]]
id = "{EMBED_MODEL}"
kind = "embedding"
source = "{EMBED_MODEL}"
""",
        tmp_path_factory,
        log_dir,
    )
    yield server
    server.stop_gracefully()


def test_a_premium_request_overtakes_standard_ones_queued_before_it(classed):
    url = f"{classed.base_url}/v1/embeddings"
    finished: list[tuple[str, float]] = []
    lock = threading.Lock()

    def send(key: str, label: str) -> None:
        response = httpx.post(url, headers={"Authorization": f"Bearer {key}"},
                              json={"model": EMBED_MODEL, "input": SENTENCES}, timeout=120)
        assert response.status_code == 200, response.text
        with lock:
            finished.append((label, time.monotonic()))

    # Warm up, then queue the standard requests (several seconds of work) and the premium one last.
    send(STANDARD_KEY, "warm-up")
    finished.clear()
    threads = [threading.Thread(target=send, args=(STANDARD_KEY, f"standard-{i}")) for i in range(STANDARD_REQUESTS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    premium = threading.Thread(target=send, args=(PREMIUM_KEY, "premium"))
    premium.start()
    for thread in [*threads, premium]:
        thread.join()
    order = [label for label, _ in sorted(finished, key=lambda item: item[1])]
    after = len(order) - 1 - order.index("premium")
    assert after >= STANDARD_REQUESTS // 2, f"only {after} standard requests finished after the premium one: {order}"
