"""recipes/long-context.yaml runs at a tiny size: the demo-shaped model extended with ABF at a longer
length, with its long-context evaluations (passkey by generation, loss by position) in the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

from smoltrain.config import Config, DataConfig, load_config
from smoltrain.model.transformer import build_model
from smoltrain.train.load_model import save_model_folder

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "long-context.yaml"


def test_long_context_recipe_extends_a_demo_model_and_evaluates_retrieval(tmp_path):
    demo = load_config(RECIPE.parent / "demo.yaml").model
    init = save_model_folder(build_model(demo, seed=0), Config(model=demo, data=DataConfig(seq_len=256)), tmp_path / "demo")
    run = tmp_path / "run"
    overrides = [f"train.init={init}", f"train.out_dir={run}", f"data.cache_dir={tmp_path / 'cache'}",
                 "data.embedded_fraction=0.03", "data.seq_len=512", "model.max_seq_len=512", "train.max_steps=2",
                 "train.global_batch_tokens=1024", "train.log_every=1", "train.eval_every=2", "train.save_every=2",
                 "eval.tasks=[passkey@512]", "eval.limit=1", "eval.val_batches=1", "eval.position_buckets=4"]
    done = subprocess.run([sys.executable, "-m", "smoltrain", "train", str(RECIPE), *[x for o in overrides for x in ("--set", o)]],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evaluation = [m["eval"] for m in lines if "eval" in m][-1]
    assert evaluation["tasks"]["passkey@512"]["n"] == 1
    assert [c["end"] for c in evaluation["loss_by_position"]["prose"]][-1] == 512
    saved = load_config(run / "config.yaml")
    assert saved.model.rope_theta == 80000.0 and saved.model.hidden_size == demo.hidden_size  # ABF on the demo shape
