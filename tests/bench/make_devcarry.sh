#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Packs what the GPU test machine (no network) lacks for tests/bench/run_device_*.sh into
# .devcarry/deps.tar.xz (~9 MB; the device tool carries at most 64 MiB with the working tree):
# TBB from PyPI wheels, oneDNN 2.6 and its OpenCL loader from Debian, kt-kernel 0.7.2's AMX extension. Run on a
# Debian/Ubuntu machine with network (.devcarry/ is git-ignored; the device tool carries it by name).
# SLIM=1 packs TBB only (see below).
set -euo pipefail
w=$(mktemp -d)
p=$w/prefix
mkdir -p "$p/lib" "$p/include" "$p/kt" .devcarry
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 -d "$w" tbb-devel==2023.2.0 tbb==2023.2.0
# kt-kernel 0.7.2 (its cp312 wheel is manylinux_2_35; ~100 MB): only the AMX extension and its libs.
python3 -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
  --platform manylinux_2_35_x86_64 -d "$w" kt-kernel==0.7.2
(cd "$w" && apt-get download libdnnl2 libdnnl-dev ocl-icd-libopencl1 >/dev/null)
for f in "$w"/tbb*.whl; do unzip -q -o "$f" -d "$w/tbb"; done
cp -a "$w"/tbb/tbb_devel-*.data/data/include/* "$p/include/"
cp -a "$w"/tbb/tbb_devel-*.data/data/lib/cmake "$p/lib/"
for l in libtbb.so.12 libtbbmalloc.so.2 libtbbmalloc_proxy.so.2; do
  cp "$w"/tbb/tbb-*.data/data/lib/$l "$p/lib/"
  ln -sf $l "$p/lib/${l%%.so.*}.so"
done
for d in "$w"/*.deb; do dpkg-deb -x "$d" "$w/deb"; done
cp -a "$w"/deb/usr/lib/x86_64-linux-gnu/libdnnl.so* "$w"/deb/usr/lib/x86_64-linux-gnu/libOpenCL.so.1* "$p/lib/"
cp -a "$w"/deb/usr/include/* "$p/include/"
unzip -q -o "$w"/kt_kernel-*.whl 'kt_kernel/_kt_kernel_ext_amx*' 'kt_kernel.libs/*' -d "$p/kt"
# SLIM=1: TBB only (~1.4 MB), for calls that carry .devcarry/onednn3.tar.xz too: with the tracked
# tree at ~49 MB the full archive and oneDNN 3 together exceed the device's 64 MiB carry.
if [ "${SLIM:-0}" = 1 ]; then
  rm -rf "$p/kt" "$p"/lib/libdnnl.so* "$p"/lib/libOpenCL.so* "$p"/include/dnnl* "$p/include/oneapi/dnnl"
fi
tar -cJf .devcarry/deps.tar.xz -C "$p" .
rm -rf "$w"
ls -la .devcarry/deps.tar.xz
