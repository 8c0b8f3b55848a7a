#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Installs tidal's build and test dependencies on a Debian/Ubuntu machine: system packages through apt
# (only those missing), then the Python packages the tests use through pip. Safe to run again.
set -euo pipefail

pkgs=(build-essential cmake ninja-build pkg-config ccache git clang
      libfmt-dev libhwloc-dev libtbb-dev nlohmann-json3-dev libboost-dev libgtest-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ! python3 -m pip --version >/dev/null 2>&1; then
  missing+=(python3-pip)
fi
if ! python3 -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
  missing+=(python3-dev)
fi
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "install-deps: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# libFuzzer for the fuzz harnesses (tests/fuzz): probed by linking a one-line target; its package is
# named after clang's major version (Debian 12: libclang-rt-14-dev, Ubuntu 24.04: libclang-rt-18-dev).
fuzz_probe() {
  printf 'extern "C" int LLVMFuzzerTestOneInput(const char*, unsigned long) { return 0; }\n' |
    clang++ -x c++ -fsanitize=fuzzer - -o /tmp/tidal-fuzz-probe.$$ >/dev/null 2>&1
  local rc=$?
  rm -f /tmp/tidal-fuzz-probe.$$
  return $rc
}
if ! fuzz_probe; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  v=$(clang++ -dumpversion | cut -d. -f1)
  echo "install-deps: apt-get install libclang-rt-$v-dev (libFuzzer)"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "libclang-rt-$v-dev" >/dev/null ||
    echo "install-deps: warning: no libFuzzer package for clang $v; tests/fuzz/run.sh will say so"
fi

# Debian's own python3 is "externally managed" (PEP 668); this lets pip install next to it. It has no
# effect on a virtual environment or a pyenv/conda Python.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q --disable-pip-version-check "numpy>=1.22" "tokenizers>=0.21.1" "jinja2>=3.1" "tqdm>=4.60" \
  "pytest>=7" "nbclient>=0.7" "nbformat>=5" "ipykernel>=6" "matplotlib>=3.5" "gguf>=0.10" \
  "fastapi>=0.110" "uvicorn>=0.29" "openai>=1.30" "httpx>=0.27"
