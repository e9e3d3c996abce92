"""The demo recipe's first steps against a checked-in loss curve: any change to the model, data
pipeline, tokenizer training, optimizer or schedule that moves the numbers shows up here.

Regenerate (after an intended change, and say why in docs/LOG.md):
    SMOLTRAIN_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_golden.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "demo_loss_curve.json"
STEPS = 10
# Loose enough for another CPU's summation order (float reordering moves these ~1e-6), tight enough
# to catch the subtlest switch: document masking off moves the curve by 5e-4 to 6e-4 relative.
RELATIVE_TOLERANCE = 1e-4


@pytest.mark.slow
def test_demo_recipe_loss_curve_matches_the_golden_curve(tmp_path):
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "smoltrain", "train", str(ROOT / "recipes" / "demo.yaml"),
         "--set", f"train.out_dir={run}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--set", "data.embedded_fraction=0.03", "--set", f"train.max_steps={STEPS}",
         "--set", "train.log_every=1", "--set", f"train.eval_every={STEPS}", "--set", "eval.val_batches=2"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    curve = {
        "loss": [m["loss"] for m in lines if "loss" in m and "event" not in m],
        "lr": [m["lr"] for m in lines if "loss" in m and "event" not in m],
        "val_loss": {k: v["loss"] for k, v in next(m["eval"]["val"] for m in lines if "eval" in m).items()},
    }
    if os.environ.get("SMOLTRAIN_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(curve, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(curve["loss"]) == STEPS
    assert curve["lr"] == pytest.approx(golden["lr"], rel=1e-9)
    assert curve["loss"] == pytest.approx(golden["loss"], rel=RELATIVE_TOLERANCE)
    assert curve["val_loss"] == pytest.approx(golden["val_loss"], rel=RELATIVE_TOLERANCE)
