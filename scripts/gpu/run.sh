#!/usr/bin/env bash
# Runs on the GPU machine, from the repository root, with gpu-bundle/ from scripts/gpu/prepare.sh:
#   1. the device test subset (tests/device.rs) against the CPU, on Vulkan;
#   2. the CPU-vs-GPU equivalence check (same parameters, batches, dropout masks; 5 steps);
#   3. Frappe trained on the GPU (when the data is there), to compare its test AUC with the CPU's;
#   4. the speed benchmark against the PyTorch installed there (eager and torch.compile, CUDA),
#      Frappe and Criteo-shaped configs at batch 4096 and 65536, f32 and bf16 (autocast there).
# Frappe is trained in f32, with bf16 matrix products, and with an f16 embedding table.
# Everything is written under $OUT (default gpu-out/) and summarized in $OUT/gpu_report.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
bundle="$PWD/gpu-bundle"
export LD_LIBRARY_PATH="$bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
device="${WUKONG_GPU:-vulkan}"
report="$out/gpu_report.md"
# Seconds allowed to each step (tests, equivalence, each training and bench): a hung driver or a
# slow compile costs one step, not the lease.
limit="${GPU_STEP_LIMIT:-240}"

# The NVIDIA Vulkan driver is libGLX_nvidia.so.0. Prefer the manifest the driver mount ships
# (seen at /usr/local/nvidia/share/vulkan/icd.d on the lent H200); containers often have none in
# the loader's default places, and then one is written for the library ldconfig finds.
driver_icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if [ -e "$driver_icd" ]; then
  export VK_ICD_FILENAMES="$driver_icd" VK_DRIVER_FILES="$driver_icd"
  echo "using the driver's ICD manifest $driver_icd"
elif ! ls /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json >/dev/null 2>&1; then
  glx=$(ldconfig -p 2>/dev/null | awk '/libGLX_nvidia.so.0/ {print $NF; exit}')
  if [ -n "$glx" ]; then
    printf '{"file_format_version":"1.0.0","ICD":{"library_path":"%s","api_version":"1.3.0"}}\n' "$glx" > "$out/nvidia_icd.json"
    export VK_ICD_FILENAMES="$PWD/$out/nvidia_icd.json" VK_DRIVER_FILES="$PWD/$out/nvidia_icd.json"
    echo "wrote an ICD manifest for $glx"
  else
    echo "warning: no NVIDIA Vulkan ICD found (nvidia_icd.json / libGLX_nvidia.so.0)"
  fi
fi

{
  echo "# GPU run $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())' 2>&1 | tail -1
  echo '```'
} > "$report"

step() { echo; echo "== $1"; echo >> "$report"; echo "## $1" >> "$report"; echo >> "$report"; }
# A step's failure in the report: its exit status, and whether the time limit cut it.
failed_note() { [ "$1" = 0 ] || echo "exit $1$([ "$1" = 124 ] && echo ": cut at ${limit} s")" >> "$report"; }

step "Device tests (tests/device.rs, WUKONG_TEST_DEVICE=$device)"
WUKONG_TEST_DEVICE="$device" timeout "$limit" "$bundle/device-tests" --test-threads 1 2>&1 | tee "$out/device-tests.log"
echo "exit ${PIPESTATUS[0]}: \`$(grep 'test result' "$out/device-tests.log" | tail -1)\`" >> "$report"

step "CPU vs $device equivalence (Frappe config, 5 steps)"
timeout "$limit" "$bundle/wukong" equivalence benchmarks/configs/frappe.toml --device "$device" --steps 5 2>&1 | tee "$out/equivalence.log"
{ echo '```'; grep -v BENCH_RESULT "$out/equivalence.log"; echo '```'; } >> "$report"

# Order after the checks: the figures that matter most first (a lease is minutes long and the
# run may be cut): Frappe in f32, speed in f32 at both batch sizes, then bf16 speed, then the bf16
# and f16-table Frappe runs.
cfg=configs/frappe_wukong.toml
have_frappe=1
if [ ! -e ../shared/data/frappe ]; then
  if [ -e shared/data/frappe ]; then
    sed 's#\.\./shared/#shared/#g' "$cfg" > "$out/frappe_gpu.toml"; cfg="$out/frappe_gpu.toml"
  else
    have_frappe=0
  fi
fi

frappe() { # $1: label, then extra train flags
  local label="$1"; shift
  step "Frappe on $device, $label (configs/frappe_wukong.toml)"
  if [ "$have_frappe" = 0 ]; then
    echo "skipped: no Frappe data (../shared/data/frappe or shared/data/frappe)" | tee -a "$report"; return
  fi
  local log="$out/frappe-train-$label.log"
  timeout "$limit" "$bundle/wukong" train --config "$cfg" --device "$device" --out "$out/runs" "$@" 2>&1 \
    | tee "$log" | grep -v '^epoch .*\['
  failed_note "${PIPESTATUS[0]}"
  grep -E "test AUC|best epoch|error|guard" "$log" >> "$report"
}

speed() { # $1: batch, $2: precision
  step "Speed at batch $1, $2: ours ($device) vs PyTorch (CUDA eager, torch.compile)"
  timeout "$limit" "$bundle/wukong" bench benchmarks/configs/frappe.toml benchmarks/configs/criteo.toml \
    --device "$device" --batch-size "$1" --precision "$2" --work-dir "$out/bench-work" \
    --out "$out/bench-$1-$2.md" 2>"$out/bench-$1-$2.log"
  failed_note $?
  cat "$out/bench-$1-$2.md" >> "$report" 2>/dev/null || echo "bench failed: see bench-$1-$2.log" >> "$report"
}

frappe f32
speed 4096 f32
speed 65536 f32
speed 4096 bf16
speed 65536 bf16
frappe bf16 --precision bf16
frappe f16-table --emb-storage f16
rm -rf "$out/bench-work"
echo; echo "report: $report"
