"""The shared report module on a synthetic run folder (config.yaml + metrics.jsonl written here)."""

from __future__ import annotations

import base64
import json
import re
import statistics

import pytest
import torch

from smoltrain.cli import main
from smoltrain.config import config_from_dict, save_config
from smoltrain.errors import DataError
from smoltrain.model.transformer import Transformer
from smoltrain.report.document import Report
from smoltrain.report.run import flatten_eval, lower_is_better, read_metrics, report_run

TINY = {
    "model": {"vocab_size": 300, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 64, "max_seq_len": 64, "tie_embeddings": False},
    "data": {"seq_len": 32},
    "train": {"max_steps": 40, "global_batch_tokens": 128, "micro_batch_size": 4, "log_every": 2},
}


def _eval(step: int) -> dict:
    return {"step": step, "eval": {
        "val": {"code": {"loss": 5.0 - step / 20, "bpb": 2.0, "tokens": 4096},
                "prose": {"loss": 5.5 - step / 20, "bpb": 2.2, "tokens": 4096}},
        "tasks": {"arithmetic_choice": {"acc": 0.3, "acc_norm": 0.32, "acc_stderr": 0.046, "n": 100, "score": 0.3,
                                        "random_baseline": 0.25, "centred": 0.0667},
                  "arithmetic_answer": {"exact_match": 0.01, "quasi_exact_match": 0.02, "quasi_exact_match_stderr": 0.014,
                                        "n": 100, "score": 0.02, "random_baseline": 0.0, "centred": 0.02}},
        "aggregate": {"centred": 0.0433, "score": 0.16, "random_baseline": 0.125, "tasks": 2},
    }}


@pytest.fixture
def run_dir(tmp_path):
    """20 logged steps, then a crash and a resume that re-logs steps 31-40, then a line cut mid-write."""
    run = tmp_path / "run"
    save_config(config_from_dict(TINY), run / "config.yaml")
    lines, throughput = [], []
    for step in range(2, 41, 2):
        tps = 1000.0 + 37 * (step % 7)
        throughput.append(tps)
        lines.append({"step": step, "tokens": step * 128, "loss": 6.0 - step / 10, "lr": 1e-3,
                      "grad_norm": 1.0 + step / 100, "tokens_per_s": tps, "mfu": None, "elapsed_s": step * 0.5})
        if step == 20:
            lines.append(_eval(step))
    resumed = [dict(line, loss=line["loss"] - 0.5) for line in lines if "loss" in line and line["step"] > 30]
    text = "\n".join(json.dumps(x) for x in lines + resumed + [_eval(40)]) + "\n" + '{"step": 41, "lo'
    (run / "metrics.jsonl").write_text(text)
    return run, throughput


def test_resumed_run_keeps_the_newest_line_per_step_and_ignores_a_truncated_last_line(run_dir):
    run, _ = run_dir
    train, evals = read_metrics(run)
    assert [r["step"] for r in train] == list(range(2, 41, 2))
    assert train[-1]["loss"] == pytest.approx(6.0 - 4.0 - 0.5)  # the re-logged value after the resume
    assert train[10]["loss"] == pytest.approx(6.0 - 2.2)  # step 22: before the crash point, logged once
    assert [e["step"] for e in evals] == [20, 40]


def test_bad_line_in_the_middle_names_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(tmp_path)


def test_run_report_embeds_every_png_referenced_by_the_markdown(run_dir):
    run, _ = run_dir
    md_path, html_path = report_run(run)
    markdown, page = md_path.read_text(), html_path.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert len(images) >= 4  # loss, lr, grad norm, throughput
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == len(images)
    for relative, data in zip(images, embedded):
        png = (md_path.parent / relative).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert base64.b64decode(data) == png  # the HTML is self-contained: same bytes, no file links
    assert "<img src=\"figures" not in page and 'src="loss.png' not in page


def test_run_report_states_parameters_throughput_and_final_eval(run_dir):
    run, throughput = run_dir
    md_path, _ = report_run(run, run / "elsewhere")
    assert md_path.parent == run / "elsewhere"
    markdown = md_path.read_text()
    with torch.device("meta"):  # an independent count: the model itself, not the counting formula
        expected_params = sum(p.numel() for p in Transformer(config_from_dict(TINY).model).parameters())
    assert f"{expected_params:,}" in markdown
    median = statistics.median(throughput[1:])  # the first log line (warm-up) is left out
    assert f"{median:.4g}" in markdown
    assert "Evaluation at step 40" in markdown
    assert "| arithmetic_choice | acc | 0.3 | 0.046 | 0.25 | 0.0667 | 100 |" in markdown
    assert "| arithmetic_answer | quasi_exact_match | 0.02 | 0.014 | 0 | 0.02 | 100 |" in markdown
    assert "mean score 0.16 against a random baseline of 0.125" in markdown and "**+0.0433**" in markdown
    assert "| code | 3 | 2 | 4,096 |" in markdown


def test_flatten_eval_keeps_main_scores_and_drops_counts_errors_and_baselines():
    flat = flatten_eval(_eval(10)["eval"])
    assert flat == {
        "val/code/loss": 4.5, "val/code/bpb": 2.0, "val/prose/loss": 5.0, "val/prose/bpb": 2.2,
        "tasks/arithmetic_choice/score": 0.3, "tasks/arithmetic_answer/score": 0.02,
        "aggregate/centred": 0.0433, "aggregate/score": 0.16,
    }
    assert flatten_eval({"tasks": {"custom": {"acc": 0.5, "acc_stderr": 0.1, "n": 4}}}) == {"tasks/custom/acc": 0.5}
    assert lower_is_better("val/code/loss") and lower_is_better("val/code/bpb") and lower_is_better("val/position/192-255")
    assert not lower_is_better("tasks/arithmetic_choice/score") and not lower_is_better("aggregate/centred")


def test_markdown_and_html_escape_table_cells(tmp_path):
    report = Report("a <b> & c").table(["x|y", "z"], [("1 | 2", "<script>")]).text("use `smoltrain` **now**")
    md_path, html_path = report.write(tmp_path)
    assert "| 1 \\| 2 | <script> |" in md_path.read_text()
    page = html_path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<code>smoltrain</code> <strong>now</strong>" in page
    assert not list(tmp_path.glob("*.tmp"))


def test_report_cli_on_a_folder_that_is_not_a_run_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.yaml: missing" in err


def test_report_cli_writes_the_report(run_dir, capsys):
    run, _ = run_dir
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def test_run_report_shows_each_stage_and_says_the_median_skips_the_first_interval(tmp_path):
    staged = json.loads(json.dumps(TINY))
    staged["model"]["rope_theta"] = 10000.0
    staged["train"]["global_batch_tokens"] = 256  # the 64-token stage's micro-batches must divide it too
    staged["data"].update(sources={"web": "w", "code": "c"}, mixture={"web": 3, "code": 1}, stages=[
        {"name": "decay", "start_step": 20, "mixture": {"web": 1, "code": 1}},
        {"name": "long", "start_step": 30, "seq_len": 64, "rope_theta": 500000.0},
    ])
    run = tmp_path / "run"
    save_config(config_from_dict(staged), run / "config.yaml")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens": s * 128, "loss": 5.0, "tokens_per_s": 1e3})
                                               + "\n" for s in range(2, 41, 2)))
    markdown = report_run(run)[0].read_text()
    assert "| sequence length | 32 -> 64 |" in markdown
    assert "| base | 1-20 | 32 | 10000 | web 75%, code 25% |" in markdown
    assert "| decay | 21-30 | 32 | 10000 | web 50%, code 50% |" in markdown
    assert "| long | 31-40 | 64 | 500000 | web 50%, code 50% |" in markdown
    assert "tokens/s (median, first log interval skipped" in markdown
