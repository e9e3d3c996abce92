"""`smoltrain doctor --run RUN_DIR`: reads a run folder (running or finished) and names what its own
metrics show, each finding of a kind from report/diagnosis.py's documented set.

low_mfu needs the device's real matmul rate: it is measured here, in the run's precision, when this
machine has the device the run logged (the usual case: the doctor runs next to the job), or given
with --matmul-tflops; otherwise low_mfu is not judged and the output says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smoltrain.doctor.compute import time_matmul
from smoltrain.errors import ConfigError, DataError
from smoltrain.report.diagnosis import diagnose
from smoltrain.report.run import read_records
from smoltrain.train.distributed import resolve_device

MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}  # large enough to reach the device's rate (doctor/timing.py's sizes)
MATMUL_S = 0.5


def this_device() -> tuple[torch.device, str]:
    device = resolve_device("auto")
    return device, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def measured_matmul_tflops(records: list[dict]) -> tuple[float | None, str]:
    """(this device's square-matmul TFLOP/s in the run's precision, how it was found), or None when this
    machine lacks the device the run logged."""
    logged = [r for r in records if "device" in r and "loss" in r]
    if not logged:
        return None, "the run logged no device (written before smoltrain logged one): low_mfu not judged"
    device_name, precision = logged[-1]["device"], logged[-1].get("precision", "fp32")
    device, here = this_device()
    if here != device_name:
        return None, f"the run used {device_name}, this machine has {here}: low_mfu not judged (--matmul-tflops)"
    n = MATMUL_SIZE[device.type]
    seconds = time_matmul(n, n, n, "bf16" if precision == "bf16" else "fp32", device, MATMUL_S)
    rate = 2 * n**3 / seconds / 1e12
    return rate, f"{precision} matmul {n}x{n} measured here: {rate:.3g} TFLOP/s"


def diagnose_run(run_dir: str, json_out: str | None = None, matmul_tflops: float | None = None,
                 console=None) -> dict:
    """Read RUN_DIR/metrics.jsonl, judge it, print the findings; returns (and with json_out writes)
    {run_dir, logged_steps, matmul_tflops, matmul_note, findings}."""
    if not Path(run_dir).is_dir():
        raise DataError(f"--run {run_dir}: no such run folder")
    if json_out and not Path(json_out).absolute().parent.is_dir():
        raise ConfigError(f"--json {json_out}: folder {Path(json_out).parent} does not exist")
    records = read_records(run_dir)
    note = "given with --matmul-tflops"
    if matmul_tflops is None:
        matmul_tflops, note = measured_matmul_tflops(records)
    findings = diagnose(records, matmul_tflops)
    logged = len({r["step"] for r in records if "loss" in r and "event" not in r})
    result = {"run_dir": str(run_dir), "logged_steps": logged, "matmul_tflops": matmul_tflops, "matmul_note": note,
              "findings": [f.to_dict() for f in findings]}
    print_findings(result, console)
    if json_out:
        from smoltrain.files import write_json

        write_json(json_out, result)
    return result


def print_findings(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(highlight=False)
    findings = result["findings"]
    console.print(f"doctor --run {result['run_dir']}: {result['logged_steps']} logged steps, "
                  f"{len(findings) or 'no'} finding{'' if len(findings) == 1 else 's'} ({result['matmul_note']})")
    if not findings:
        return
    table = Table(show_lines=True)
    for column in ("kind", "steps", "evidence", "likely cause", "check"):
        table.add_column(column, overflow="fold")
    for f in findings:
        table.add_row(f["kind"], f"{f['steps'][0]}-{f['steps'][1]}", f["summary"], f["cause"], f["check"])
    console.print(table)


def exit_code(result: dict, strict: bool) -> int:
    """1 under --strict when there is any finding, else 0 (2 is kept for user mistakes)."""
    return 1 if strict and result["findings"] else 0


__all__ = ["diagnose_run", "exit_code", "measured_matmul_tflops", "print_findings"]
