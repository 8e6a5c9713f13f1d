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

# The NVIDIA Vulkan driver is libGLX_nvidia.so.0; containers often lack its ICD manifest.
if ! ls /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json >/dev/null 2>&1; then
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

step "Device tests (tests/device.rs, WUKONG_TEST_DEVICE=$device)"
WUKONG_TEST_DEVICE="$device" "$bundle/device-tests" --test-threads 1 2>&1 | tee "$out/device-tests.log"
echo "exit ${PIPESTATUS[0]}: \`$(grep 'test result' "$out/device-tests.log" | tail -1)\`" >> "$report"

step "CPU vs $device equivalence (Frappe config, 5 steps)"
"$bundle/wukong" equivalence benchmarks/configs/frappe.toml --device "$device" --steps 5 2>&1 | tee "$out/equivalence.log"
{ echo '```'; grep -v BENCH_RESULT "$out/equivalence.log"; echo '```'; } >> "$report"

step "Frappe on $device (configs/frappe_wukong.toml)"
if [ -e ../shared/data/frappe ] || [ -e shared/data/frappe ]; then
  cfg=configs/frappe_wukong.toml
  [ -e ../shared/data/frappe ] || { sed 's#\.\./shared/#shared/#g' "$cfg" > "$out/frappe_gpu.toml"; cfg="$out/frappe_gpu.toml"; }
  "$bundle/wukong" train --config "$cfg" --device "$device" --out "$out/runs" 2>&1 | tee "$out/frappe-train.log" | grep -v '^epoch .*\[' 
  grep -E "test AUC|best epoch" "$out/frappe-train.log" >> "$report"
  "$bundle/wukong" train --config "$cfg" --device "$device" --precision bf16 --out "$out/runs" 2>&1 | tee "$out/frappe-train-bf16.log" | grep -v '^epoch .*\['
  echo "bf16:" >> "$report"; grep -E "test AUC|best epoch" "$out/frappe-train-bf16.log" >> "$report"
  "$bundle/wukong" train --config "$cfg" --device "$device" --emb-storage f16 --out "$out/runs" 2>&1 | tee "$out/frappe-train-f16-table.log" | grep -v '^epoch .*\['
  echo "f16 embedding table:" >> "$report"; grep -E "test AUC|best epoch|error" "$out/frappe-train-f16-table.log" >> "$report"
else
  echo "skipped: no Frappe data (../shared/data/frappe or shared/data/frappe)" | tee -a "$report"
fi

for p in f32 bf16; do
  for b in 4096 65536; do
    step "Speed at batch $b, $p: ours ($device) vs PyTorch (CUDA eager, torch.compile)"
    "$bundle/wukong" bench benchmarks/configs/frappe.toml benchmarks/configs/criteo.toml \
      --device "$device" --batch-size "$b" --precision "$p" --work-dir "$out/bench-work" \
      --out "$out/bench-$b-$p.md" 2>"$out/bench-$b-$p.log"
    cat "$out/bench-$b-$p.md" >> "$report" 2>/dev/null || echo "bench failed: see bench-$b-$p.log" >> "$report"
  done
done
rm -rf "$out/bench-work"
echo; echo "report: $report"
