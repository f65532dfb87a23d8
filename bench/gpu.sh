#!/usr/bin/env bash
# The GPU figures: the CUDA-marked tests, then recipes/gpu.toml, then the report's table (size, held-out quality,
# ARC-Easy / PIQA accuracy, speed) and each stage's wall time. On a machine with one CUDA GPU, from the repository:
#
#     bash bench/gpu.sh [RUN_DIR]          # default runs/gpu; PYTHON=... to use another interpreter
#
# It needs a venv with a CUDA build of torch (`make install TORCH=torch`) and bitsandbytes. Everything it prints is
# also in RUN_DIR: pytest-gpu.txt, pipeline.json, report/report.md and report.json, machine.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
RUN=${1:-runs/gpu}
mkdir -p "$RUN"

"$PYTHON" - <<'EOF' | tee "$RUN/machine.txt"
import os, platform, torch
assert torch.cuda.is_available(), "no CUDA device: bench/gpu.sh measures the GPU recipe on a GPU"
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"{os.cpu_count()} CPU cores; {platform.platform()}")
EOF

echo "== CUDA-marked tests"
"$PYTHON" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$RUN/pytest-gpu.txt" | tail -n 5

echo "== recipes/gpu.toml -> $RUN"
start=$(date +%s)
"$PYTHON" -m pistill.cli run recipes/gpu.toml --out "$RUN"
echo "wall time: $(( $(date +%s) - start )) s"

"$PYTHON" - "$RUN" <<'EOF'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
stages = json.loads((run / "pipeline.json").read_text())["stages"]
print("== stage wall times (s): " + ", ".join(f"{s['stage']} {s['wall_s']:.0f}" for s in stages))
data = json.loads((run / "data" / "manifest.json").read_text())["metrics"]
gen, si = data.get("generation", {}), data.get("self_instruct", {})
print(f"== data: {si.get('kept')} new tasks of {si.get('proposed')} proposed, {data.get('generated')} answers, "
      f"{gen.get('new_tokens')} tokens generated at {gen.get('tokens_per_s')} tokens/s ({gen.get('generator')}), "
      f"{data.get('gen_blocks')} generated training blocks")
distill = json.loads((run / "distill" / "manifest.json").read_text())["metrics"]
print(f"== distill: {distill.get('steps')} steps at {distill.get('tokens_per_s', 0):.0f} tokens/s, loss "
      f"{distill.get('loss_first', 0):.3f} -> {distill.get('loss_last', 0):.3f}, qat {distill.get('qat', 'none')}")
print((run / "report" / "report.md").read_text())
EOF
