#!/usr/bin/env bash
# Builds, on this (CPU) machine, everything the GPU machine needs into gpu-bundle/ (git-ignored;
# the device tool carries it): the `vulkan` build of `wukong`, the device test binary, and the
# Vulkan loader and GL dispatch libraries (from Debian's packages) to put beside them. The GPU machine has no
# Rust toolchain and no network. A clean `vulkan` build takes ~40 CPU-minutes; it gets its own
# target directory so it never invalidates the default (CPU) build.
#
#   scripts/gpu/prepare.sh            # then, on the GPU machine: scripts/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/../target-vulkan}"
bundle=gpu-bundle
mkdir -p "$bundle/lib"

cargo build --release --features vulkan
cp "$CARGO_TARGET_DIR/release/wukong" "$bundle/wukong"
test_exe=$(cargo test --release --features vulkan --test device --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device":
        print(m["executable"])')
cp "$test_exe" "$bundle/device-tests"
strip "$bundle/wukong" "$bundle/device-tests"

# The Vulkan loader and the GL vendor-neutral dispatch libraries: NVIDIA's Vulkan driver
# (libGLX_nvidia.so.0) loads libGLdispatch/libGLX, which bare CUDA images lack. On the lent H200
# (2026-12-04) the loader alone found no adapter; with these libraries unpacked it ran.
if [ ! -e "$bundle/lib/libGLdispatch.so.0" ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download libvulkan1 libglvnd0 libglx0 libegl1 libgl1 libopengl0 >/dev/null 2>&1 \
    && for d in *.deb; do dpkg-deb -x "$d" root; done)
  cp -L "$tmp"/root/usr/lib/x86_64-linux-gnu/lib*.so.[0-9] "$bundle/lib/"
  rm -rf "$tmp"
fi
du -sh "$bundle"/*
echo "bundle ready: carry gpu-bundle to the GPU machine and run scripts/gpu/run.sh there"
