"""Training metrics: metrics.jsonl (the run-folder contract), the console line, TensorBoard, MFU,
and the loss-spike detector.

MFU is measured against the accelerator's dense bf16 peak from its spec sheet (989 TFLOP/s for an
H100 SXM), the PaLM definition most papers use; SmolLM3's ~14k tokens/s/GPU at 3B is ~29% by it.
The project's PLAYBOOK table uses a measured 791 TFLOP/s matmul peak instead: multiply our MFU by
989/791 = 1.25 to compare, or set `train.peak_tflops: 791`.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path

import torch

from smoltrain.files import write_atomic

# Dense (no sparsity) bf16 tensor-core TFLOP/s from vendor spec sheets, matched as substrings of
# torch.cuda.get_device_name(), most specific first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The bf16 peak of one device, or None when unknown (CPUs: MFU is then reported as null)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def peak_for_name(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


# The rest of the spec sheet, for `smoltrain doctor`: dense fp32 (non-tensor-core) TFLOP/s and memory
# bandwidth in TB/s, matched like PEAK_BF16_TFLOPS. fp16 tensor-core peaks equal bf16, tf32 is half of
# bf16 and fp8 twice it on every device here that has each (HAS_FP8: Ada, Hopper, Blackwell, MI300).
SPEC_SHEET = (  # (name substring, fp32 TFLOP/s, memory TB/s)
    ("H100 PCIe", 51.0, 2.0),
    ("H100 NVL", 60.0, 3.9),
    ("H200 NVL", 60.0, 4.8),
    ("GH200", 67.0, 4.0),
    ("H100", 67.0, 3.35),
    ("H200", 67.0, 4.8),
    ("B200", 75.0, 8.0),
    ("A100-SXM4-80GB", 19.5, 2.039),
    ("A100 80GB PCIe", 19.5, 1.935),
    ("A100", 19.5, 1.555),
    ("L40S", 91.6, 0.864),
    ("L40", 90.5, 0.864),
    ("L4", 30.3, 0.3),
    ("MI300X", 163.4, 5.3),
    ("MI250X", 47.9, 3.2),
)
HAS_FP8 = ("H100", "H200", "GH200", "B200", "L40", "L4", "MI300X")
NO_TF32 = ("MI250X",)


def device_spec(name: str) -> dict | None:
    """Dense TFLOP/s per precision and memory TB/s of a device from its spec sheet, None if unknown."""
    bf16 = peak_for_name(name)
    sheet = next((row for row in SPEC_SHEET if row[0] in name), None)
    if bf16 is None or sheet is None:
        return None
    return {
        "bf16": bf16,
        "fp16": bf16,
        "tf32": None if any(k in name for k in NO_TF32) else bf16 / 2,
        "fp32": sheet[1],
        "fp8": 2 * bf16 if any(k in name for k in HAS_FP8) else None,
        "memory_tb_s": sheet[2],
    }


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak (None when the peak is unknown)."""
    if not peak:
        return None
    return tokens_per_s_per_device * flops_per_token / (peak * 1e12)


# ----------------------------------------------------------------------------- spikes


class SpikeDetector:
    """A loss is a spike when it exceeds the mean of the last `window` accepted losses by more than
    `num_std` standard deviations; judged once 10 losses are known. Spikes never enter the window,
    so one spike cannot raise the bar for the next."""

    MIN_HISTORY = 10

    def __init__(self, num_std: float, window: int):
        self.num_std = num_std
        self.losses: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        if len(self.losses) < min(self.MIN_HISTORY, self.losses.maxlen):
            return None
        mean = sum(self.losses) / len(self.losses)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.losses) / len(self.losses))
        # A flat window (std ~ 0) would flag rounding noise: the spread is at least 0.1% of the mean.
        return mean + self.num_std * max(std, 1e-3 * abs(mean))

    def is_spike(self, loss: float) -> bool:
        bar = self.threshold()
        return bar is not None and loss > bar

    def update(self, loss: float) -> None:
        self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state.get("losses", []))


# ----------------------------------------------------------------------------- metrics.jsonl


def truncate_metrics(path: Path, step: int, keep_events: bool = False) -> None:
    """Drop lines after `step` (work a crash or a rewind undid; a rewind keeps the events that
    explain it) and a torn last line; rewritten atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step or (keep_events and "event" in record):
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(record: dict, max_steps: int, eta_s: float | None) -> str:
    parts = [f"step {record['step']:>{len(str(max_steps))}}/{max_steps}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.3f}", f"{_human(record['tokens_per_s'])} tok/s"
             + (f" ({_human(record['label_tokens_per_s'])} label tok/s)" if record.get("label_tokens_per_s") else "")]
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if record.get("peak_memory_gb") is not None:
        parts.append(f"mem {record['peak_memory_gb']:.1f} GB")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def eval_console_line(step: int, result: dict) -> str | None:
    """One console line for an in-training evaluation: validation loss per source, the centred
    aggregate and each task's main score (None when nothing was evaluated), e.g.
    `eval step 100 | val prose 3.412 code 2.981 | aggregate +0.052 | arithmetic_choice 0.410 prose_cloze 0.297`."""
    parts = []
    if result.get("val"):
        parts.append("val " + " ".join(f"{source} {v['loss']:.3f}" for source, v in result["val"].items()))
    if result.get("tasks"):
        if result.get("aggregate"):
            parts.append(f"aggregate {result['aggregate']['centred']:+.3f}")
        parts.append(" ".join(f"{name} {r['score']:.3f}" for name, r in result["tasks"].items()))
    for section, values in result.items():  # an objective's own evaluations (chat, preference, pass@k)
        if section in ("val", "tasks", "aggregate") or not isinstance(values, dict):
            continue
        numbers = [f"{k} {v:.3f}" for k, v in _numeric_leaves(values)
                   if not k.endswith(("_stderr", "/n")) and k not in ("n", "sampled_at_temperature")]
        if numbers:
            sampled = values.get("sampled_at_temperature")  # pass@k's samples (GRPO): at what temperature
            parts.append(f"{section} " + " ".join(numbers[:8])
                         + (f" (pass@k sampled at temperature {sampled:g})" if sampled is not None else ""))
    return f"eval step {step} | " + " | ".join(parts) if parts else None


def _numeric_leaves(values: dict, prefix: str = "") -> list[tuple[str, float]]:
    leaves = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves += _numeric_leaves(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            leaves.append((name, float(value)))
    return leaves


class MetricsLogger:
    """Appends one JSON object per line to metrics.jsonl (flushed per line, so a kill loses at most
    the line being written), mirrors numbers to TensorBoard and prints the console line.
    Only the rank that owns the run folder (rank 0) writes; other ranks get a silent logger."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.tensorboard = tensorboard
        self.file = None
        self.writer = None
        self.restart_at(start_step)

    def restart_at(self, step: int, keep_events: bool = False) -> None:
        """(Re)open at `step`: lines past it are work a crash or a rewind undid, and go."""
        if not self.enabled:
            return
        self.close()
        truncate_metrics(self.path, step, keep_events)
        self.file = open(self.path, "a", buffering=1)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the undone events in TensorBoard as truncate_metrics does here.
            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _flatten(record: dict, prefix: str = "") -> dict:
    """{"eval": {"val": {"code": {"loss": 2.1}}}} -> {"eval/val/code/loss": 2.1} for TensorBoard."""
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat
