"""`hearth ingest DIR --store NAME` against the session's server: a folder becomes a searchable
vector store, a second run skips what is there, `--replace` replaces changed files, bad files are
reported and the exit code says so."""

from __future__ import annotations

from pathlib import Path

from conftest import base_env, run_cli


def ingest(base_url: str, *args: str):
    return run_cli("ingest", "--url", base_url, *args, env=base_env(), timeout=300)


def store_named(client, name: str):
    matches = [vs for vs in client.vector_stores.list(limit=100) if vs.name == name]
    assert len(matches) == 1, matches
    return matches[0]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_folder_becomes_a_searchable_store(base_url, client, tmp_path):
    write(
        tmp_path,
        {
            "backups.md": "# Backups\nThe restic job snapshots the NAS every night and keeps thirty days.",
            "network/vpn.txt": "WireGuard tunnels connect the laptop to the home network from anywhere.",
            "network/dns.html": "<html><body><p>Pi-hole answers DNS queries and blocks advertising domains.</p></body></html>",
            "photo.png": "not a document",
            ".secret.md": "hidden files stay out",
        },
    )
    first = ingest(base_url, str(tmp_path), "--store", "homelab", "--attribute", "team=ops")
    assert first.returncode == 0, first.stderr
    assert "3 ingested, 0 replaced, 0 already there, 1 not a readable type, 0 failed" in first.stdout, first.stdout

    vs = store_named(client, "homelab")
    assert vs.file_counts.completed == 3 and vs.file_counts.failed == 0
    files = {f.attributes["path"]: f for f in client.vector_stores.files.list(vector_store_id=vs.id, limit=100)}
    assert sorted(files) == ["backups.md", "network/dns.html", "network/vpn.txt"]
    assert all(f.attributes["team"] == "ops" for f in files.values())

    hits = client.vector_stores.search(vector_store_id=vs.id, query="which tool blocks advertising in DNS?").data
    assert hits[0].attributes["path"] == "network/dns.html", hits
    only_network = client.vector_stores.search(
        vector_store_id=vs.id,
        query="nightly snapshots",
        filters={"type": "in", "key": "path", "value": ["network/vpn.txt", "network/dns.html"]},
    ).data
    assert only_network and all(h.attributes["path"].startswith("network/") for h in only_network)

    # A second run finds everything in place; --replace swaps in a changed file.
    again = ingest(base_url, str(tmp_path), "--store", "homelab")
    assert again.returncode == 0, again.stderr
    assert "0 ingested, 0 replaced, 3 already there" in again.stdout, again.stdout
    write(tmp_path, {"backups.md": "# Backups\nBorg now archives the NAS to an offsite disk every Sunday."})
    replaced = ingest(base_url, str(tmp_path / "backups.md"), "--store", vs.id, "--replace", "--quiet")
    assert replaced.returncode == 0, replaced.stderr
    assert "1 ingested, 1 replaced" in replaced.stdout, replaced.stdout
    paths = [f.attributes["path"] for f in client.vector_stores.files.list(vector_store_id=vs.id, limit=100)]
    assert sorted(paths) == ["backups.md", "network/dns.html", "network/vpn.txt"]
    top = client.vector_stores.search(vector_store_id=vs.id, query="offsite archive on Sundays").data[0]
    assert "Borg" in top.content[0].text, top


def test_unreadable_files_are_reported_and_fail_the_run(base_url, client, tmp_path):
    write(tmp_path, {"good.md": "Zigbee sensors report the greenhouse temperature.", "empty.txt": ""})
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    run = ingest(base_url, str(tmp_path), "--store", "partly-bad", "--chunk-size", "200")
    assert run.returncode == 1, run.stdout
    assert "1 ingested" in run.stdout and "2 failed" in run.stdout, run.stdout
    assert "failed: empty.txt:" in run.stderr and "failed: broken.pdf:" in run.stderr, run.stderr
    vs = store_named(client, "partly-bad")
    good = [f for f in client.vector_stores.files.list(vector_store_id=vs.id) if f.status == "completed"]
    assert len(good) == 1 and good[0].chunking_strategy.static.max_chunk_size_tokens == 200


def test_an_unreachable_server_and_bad_arguments_are_clear(tmp_path):
    write(tmp_path, {"a.md": "text"})
    down = run_cli("ingest", "--url", "http://127.0.0.1:9", str(tmp_path), "--store", "x", env=base_env())
    assert down.returncode == 1
    assert "cannot reach Hearth at http://127.0.0.1:9" in down.stderr, down.stderr
    missing = run_cli("ingest", "--url", "http://127.0.0.1:9", str(tmp_path / "nope"), "--store", "x", env=base_env())
    assert missing.returncode == 1 and "nope" in missing.stderr, missing.stderr
    bad = run_cli("ingest", str(tmp_path), "--store", "x", "--attribute", "path=a", env=base_env())
    assert bad.returncode == 2 and "own path" in bad.stderr, bad.stderr
