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
  python3 "$ex"
done
