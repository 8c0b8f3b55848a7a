#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# tidal's whole test run, the same locally and in CI: install dependencies, build and install the
# package (with the GoogleTest binary), run ctest and pytest, then the examples.
set -euo pipefail
cd "$(dirname "$0")/.."

bash .ci/install-deps.sh
export PIP_BREAK_SYSTEM_PACKAGES=1

# Compile the CUDA sources when a CUDA toolkit is present (one architecture is enough to prove they
# build; the release default covers sm_86/89/90/120). No GPU is needed to compile.
cuda_args=(-Ccmake.define.TIDAL_CUDA=OFF)
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH="$PATH:/usr/local/cuda/bin"
fi
if command -v nvcc >/dev/null 2>&1; then
  cuda_args=(-Ccmake.define.TIDAL_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=86)
fi

build_dir=build/ci
python3 -m pip install --disable-pip-version-check . \
  -Cbuild-dir="$build_dir" -Ccmake.define.TIDAL_BUILD_TESTS=ON "${cuda_args[@]}"

echo "== ctest (GoogleTest)"
ctest --test-dir "$build_dir" --output-on-failure

echo "== pytest"
# Run from tests/python so `import tidal` finds the installed package, not the source tree.
(cd tests/python && python3 -m pytest -q -p no:cacheprovider)

echo "== fuzz (libFuzzer + ASan/UBSan, ${TIDAL_FUZZ_SECONDS:-60}s per harness)"
bash tests/fuzz/run.sh "${TIDAL_FUZZ_SECONDS:-60}"

echo "== examples"
for ex in examples/*.py; do
  echo "-- $ex"
  if grep -q "^# ci: needs tidal serve" "$ex"; then  # an OpenAI client: run it against a live server
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m tidal serve models/tidal-mini --port "$port" > /tmp/tidal-serve-ci.log 2>&1 &
    server=$!
    for _ in $(seq 300); do
      python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health')" 2>/dev/null && break
      sleep 0.2
    done
    OPENAI_BASE_URL="http://127.0.0.1:$port/v1" MODEL=tidal-mini python3 "$ex" --max-tokens 64 \
      || { kill "$server"; tail -20 /tmp/tidal-serve-ci.log; exit 1; }
    kill "$server"
    wait "$server" 2>/dev/null || true
  else
    python3 "$ex"
  fi
done
