#!/usr/bin/env bash
# The trainer's GPU rows in one call, for a briefly lent GPU: the SmolLM2-135M and -360M steps next
# to transformers + torch.compile, then SmolLM3-3B at seq 4096 (ours only: 3B twice does not fit)
# with every block and every 2nd block recomputed. JSON per row under $OUT (default bench-out/).
#   bash bench/gpu.sh            # ~8 min on an H100, compile included
set -u
out="${OUT:-bench-out}"
mkdir -p "$out"
python=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$python -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"

row() {  # row NAME SECONDS ARGS...
    local name=$1 seconds=$2
    shift 2
    echo "== $name"
    timeout "$seconds" $python bench/train_step.py --device cuda --rounds 3 --json "$out/$name.json" "$@" 2>&1 | tail -2
}

row smollm2-135m 150 --shape smollm2-135m --peer-compile --profile 2
row smollm2-360m 150 --shape smollm2-360m --peer-compile
row smollm3-3b-ac-every2 120 --shape smollm3-3b --batch 2 --seq 4096 --activation-checkpointing \
    --activation-checkpointing-every 2 --skip-peer
row smollm3-3b-ac-all 120 --shape smollm3-3b --batch 2 --seq 4096 --activation-checkpointing --skip-peer

# MoE grouped GEMM and linear attention on CUDA: the step ratios, then fla's kernel against the plain form
# (the test skips where flash-linear-attention is not installed).
echo "== moe"
timeout 120 $python bench/moe_step.py --device cuda --json "$out/moe.json" 2>&1 | tail -2
echo "== delta rule (fla vs plain)"
timeout 120 $python -m pytest -q -rs tests/test_delta_rule.py -k fla 2>&1 | tail -3
