"""What a run's own metrics say went wrong, for `smoltrain doctor --run` and `smoltrain report`:
findings of a documented kind (KINDS), each with its steps, evidence, the playbook's likely cause
and what to check.

A run folder holds no reference run, so every rule compares the run with itself: throughput before
and after its best change point, the loss against its own smoothed trend (shuffled data leaves
residuals with no step-to-step memory), grad norm late against early. Thresholds sit well past what
clean runs of the demo recipe show (docs/LOG.md, 2026-12-07) and well short of the incidents.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import numpy as np

from smoltrain.train.step_timer import CLIMB_WINDOW, WARMUP_LOGS, memory_climb

# kind -> (likely cause, from the playbook where it has one; what to check)
KINDS = {
    "throughput_decline": (
        "the step got slower mid-run: with data wait rising, the loader or storage (SmolLM3's storage cache "
        "evicted the data shards and reads went to S3); otherwise a slower device or a cost that grows with "
        "the run (SmolLM3's loader index grew with the steps; a thermally throttled GPU)",
        "the time/ breakdown before and after; `smoltrain doctor --recipe` storage and loader checks; the "
        "data on local disk; GPU clocks and temperatures; memory/ for a leak"),
    "data_wait": (
        "the device waits for batches: storage too slow or too far away, or the loader does too much per batch",
        "`smoltrain doctor --recipe` storage and loader figures; the shards on local NVMe; page-cache size "
        "against the dataset"),
    "loss_noise": (
        "neighbouring steps see similar data: sequences read in document order, not shuffled (SmolLM3's noisy "
        "loss: one long low-quality file could fill a batch)",
        "the loader shuffles at the sequence level with a new permutation per epoch; a mixture source with "
        "few, long documents"),
    "loss_spike": (
        "a bad batch or an unstable step (the playbook: rewind and skip the offending batches, tighten clipping; "
        "prevention: z-loss, QK-norm, no weight decay on embeddings, clean and shuffled data)",
        "the batches at those steps; train.spike_action; the lr at those steps; grad_norm before them"),
    "grad_norm_growth": (
        "the gradient norm climbs: an lr too high for this batch and model, or instability building towards "
        "loss spikes",
        "the lr schedule and warmup, optim.grad_clip, QK-norm and z-loss, weight decay"),
    "straggler": (
        "one rank works longer than its peers and every synchronous step waits for it (SmolLM3: one thermally "
        "throttled GPU dropped all-reduce from ~350 to ~100 GB/s across 16 nodes)",
        "that host: its loader and storage (rank/slowest_data_s), CPU load from other jobs, GPU clocks "
        "(`smoltrain doctor` sustained load on it)"),
    "memory_growth": (
        "memory climbs step after step: something keeps a reference per step (a list of losses as tensors, a "
        "cache, an index that grows with the run as SmolLM3's loader's did)",
        "objects kept across steps (tensors not .item()-ed or detached), caches without a bound; memory/ fields"),
    "low_mfu": (
        "the step is far from matmul-bound: a model or micro-batch too small for the device, compile off, "
        "host overhead, data wait or communication",
        "the time/ breakdown, train.compile, micro_batch_size, `smoltrain plan` for the expected rate"),
}

THROUGHPUT_DROP = 0.3  # tokens/s after the change point below 70% of before (a neighbour's job on 2 shared cores costs ~20%)
MIN_SIDE = 3  # logged steps on each side of a change point
DATA_WAIT_SHARE = 0.15  # of a step spent waiting for data (the demo's CPU loader: under 2%)
NOISE_AUTOCORR, NOISE_Z = 0.4, 3.5  # lag-1 autocorrelation of the loss residuals, and in standard errors (1/sqrt(n))
MIN_NOISE_POINTS = 16
SPIKE_ROBUST_Z = 8.0  # a logged loss this many robust standard deviations above its trend
GRAD_GROWTH = 3.0  # grad norm's last quarter over its first (after the first quarter of the run)
LOW_MFU_SHARE = 0.05  # achieved TFLOP/s per device under 5% of the measured matmul rate


@dataclass
class Finding:
    kind: str
    steps: tuple[int, int]  # first and last step it covers
    evidence: dict
    summary: str  # the evidence in one sentence

    @property
    def cause(self) -> str:
        return KINDS[self.kind][0]

    @property
    def check(self) -> str:
        return KINDS[self.kind][1]

    def to_dict(self) -> dict:
        return {**asdict(self), "steps": list(self.steps), "cause": self.cause, "check": self.check}


def diagnose(records: list[dict], matmul_tflops: float | None = None) -> list[Finding]:
    """Findings from metrics.jsonl's records (training lines and events, in file order); low_mfu is
    judged only with the device's measured matmul rate (TFLOP/s)."""
    rows = _training_rows(records)
    events = [r for r in records if "event" in r]
    findings = []
    findings += throughput_decline(rows)
    findings += data_wait(rows)
    findings += loss_noise(rows)
    findings += loss_spikes(rows, events)
    findings += grad_norm_growth(rows)
    findings += stragglers(rows, events)
    findings += memory_growth(rows)
    if matmul_tflops:
        findings += low_mfu(rows, matmul_tflops)
    return findings


def _training_rows(records: list[dict]) -> list[dict]:
    """Log lines (not events, not evaluations), the newest per step (a resumed run re-logs steps)."""
    by_step = {}
    for r in records:
        if "loss" in r and "event" not in r and "eval" not in r:
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [(r["step"], float(r[key])) for r in rows if _number(r.get(key))]
    return [s for s, _ in kept], [v for _, v in kept]


# ----------------------------------------------------------------------------- throughput and data wait


def _change_point(values: list[float]) -> int:
    """The split k (MIN_SIDE <= k <= n - MIN_SIDE) that best fits the values as two constant levels
    (least squares, O(n) with prefix sums)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    s, s2 = np.concatenate([[0.0], np.cumsum(x)]), np.concatenate([[0.0], np.cumsum(x * x)])
    best, best_k = math.inf, MIN_SIDE
    for k in range(MIN_SIDE, n - MIN_SIDE + 1):
        left = s2[k] - s[k] ** 2 / k
        right = (s2[n] - s2[k]) - (s[n] - s[k]) ** 2 / (n - k)
        if left + right < best:
            best, best_k = left + right, k
    return best_k


def _data_share(row: dict) -> float | None:
    data, step = row.get("time/data_s"), row.get("time/step_s")
    return data / step if _number(data) and _number(step) and step > 0 else None


def _median_share(rows: list[dict]) -> float | None:
    shares = [x for x in map(_data_share, rows) if x is not None]
    return statistics.median(shares) if shares else None


def throughput_decline(rows: list[dict]) -> list[Finding]:
    """tokens/s after the best change point below (1 - THROUGHPUT_DROP) of before, within each curriculum
    stage (a longer sequence is legitimately slower per token); the first log line of a stage (compile,
    warm-up) is left out."""
    findings = []
    stages: dict = {}
    for r in rows:
        stages.setdefault(r.get("stage", -1), []).append(r)
    for stage_rows in stages.values():
        kept = [r for r in stage_rows[1:] if _number(r.get("tokens_per_s"))]
        if len(kept) < 2 * MIN_SIDE:
            continue
        k = _change_point([r["tokens_per_s"] for r in kept])
        before = statistics.median(r["tokens_per_s"] for r in kept[:k])
        after = statistics.median(r["tokens_per_s"] for r in kept[k:])
        if after >= (1 - THROUGHPUT_DROP) * before:
            continue
        wait_before, wait_after = _median_share(kept[:k]), _median_share(kept[k:])
        evidence = {"tokens_per_s_before": before, "tokens_per_s_after": after, "change": after / before - 1,
                    "data_wait_share_before": wait_before, "data_wait_share_after": wait_after}
        summary = f"tokens/s {before:,.0f} -> {after:,.0f} ({100 * (after / before - 1):+.0f}%) from step {kept[k]['step']}"
        if wait_before is not None and wait_after is not None:
            summary += f"; data wait {100 * wait_before:.0f}% -> {100 * wait_after:.0f}% of a step"
        findings.append(Finding("throughput_decline", (kept[k]["step"], kept[-1]["step"]), evidence, summary))
    return findings


def data_wait(rows: list[dict]) -> list[Finding]:
    """Logged steps that spent over DATA_WAIT_SHARE of their time waiting for data, when they are at
    least 3 and a fifth of the run's log lines (one slow read is not a pattern)."""
    shares = [(r["step"], _data_share(r)) for r in rows[1:]]
    shares = [(s, x) for s, x in shares if x is not None]
    high = [(s, x) for s, x in shares if x > DATA_WAIT_SHARE]
    if len(high) < max(3, 0.2 * len(shares)):
        return []
    median_high = statistics.median(x for _, x in high)
    evidence = {"logged_steps_over": len(high), "logged_steps": len(shares), "threshold_share": DATA_WAIT_SHARE,
                "median_share_there": median_high, "median_share_whole_run": statistics.median(x for _, x in shares)}
    summary = (f"{len(high)} of {len(shares)} logged steps waited over {100 * DATA_WAIT_SHARE:.0f}% of the step for "
               f"data (median {100 * median_high:.0f}% there)")
    return [Finding("data_wait", (high[0][0], high[-1][0]), evidence, summary)]


# ----------------------------------------------------------------------------- loss and gradients


def smooth_trend(values: list[float], window: int) -> np.ndarray:
    """A local quadratic fit over `window` points (Savitzky-Golay) at the interior points: it follows a
    learning curve's bends, which a moving average would leave in the residuals as false memory."""
    half = window // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    design = np.stack([np.ones_like(offsets), offsets, offsets**2], axis=1)
    weights = np.linalg.pinv(design)[0]  # the fitted value at the window's centre
    return np.convolve(np.asarray(values, dtype=np.float64), weights[::-1], mode="valid")


def lag1_autocorrelation(x: np.ndarray) -> float:
    x = x - x.mean()
    denominator = float(np.dot(x, x))
    return float(np.dot(x[1:], x[:-1]) / denominator) if denominator > 0 else 0.0


def _residuals(rows: list[dict]) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """(steps, loss residuals against the smoothed trend, the trend) after the first quarter of the run
    (the steep early drop), or None with fewer than MIN_NOISE_POINTS points left."""
    steps, losses = _series(rows, "loss")
    start = len(losses) // 4
    steps, losses = steps[start:], losses[start:]
    # A quarter of the points (odd, 7 to 31): long enough to pass over a run of steps that share a document,
    # short enough to follow the learning curve and a WSD decay.
    window = min(31, max(7, (len(losses) // 4) | 1))
    if len(losses) - window + 1 < MIN_NOISE_POINTS:
        return None
    trend = smooth_trend(losses, window)
    half = window // 2
    return steps[half:len(steps) - half], np.asarray(losses[half:len(losses) - half]) - trend, trend


def loss_noise(rows: list[dict]) -> list[Finding]:
    """The loss residuals' lag-1 autocorrelation over NOISE_AUTOCORR and NOISE_Z standard errors: with
    shuffled sequences one step's batch says nothing of the next one's, so it is ~0 +- 1/sqrt(n)."""
    found = _residuals(rows)
    if found is None:
        return []
    steps, residuals, trend = found
    n = len(residuals)
    r1 = lag1_autocorrelation(residuals)
    if r1 < NOISE_AUTOCORR or r1 * math.sqrt(n) < NOISE_Z:
        return []
    spread = float(residuals.std())
    # Variance against half the mean squared step-to-step difference: 1 for independent residuals,
    # 1 / (1 - r1) when neighbours share their data.
    ratio = spread**2 / (float(np.mean(np.diff(residuals) ** 2)) / 2)
    evidence = {"lag1_autocorrelation": r1, "shuffled_expectation": f"0 +- {1 / math.sqrt(n):.2f}", "points": n,
                "residual_std": spread, "residual_std_over_loss": spread / float(np.mean(trend)),
                "variance_over_step_difference_variance": ratio}
    summary = (f"loss residuals against the smoothed trend have lag-1 autocorrelation {r1:.2f} over {n} logged steps "
               f"(shuffled data: 0 +- {1 / math.sqrt(n):.2f}); residual std {spread:.3f} "
               f"({100 * spread / float(np.mean(trend)):.1f}% of the loss)")
    return [Finding("loss_noise", (steps[0], steps[-1]), evidence, summary)]


def loss_spikes(rows: list[dict], events: list[dict]) -> list[Finding]:
    """The trainer's spike and non-finite events, and logged losses SPIKE_ROBUST_Z robust standard
    deviations (1.4826 x the median absolute residual) above the smoothed trend."""
    flagged = {int(e["step"]): e.get("event") for e in events if e.get("event") in ("spike", "nonfinite")}
    found = _residuals(rows)
    if found is not None:
        steps, residuals, _ = found
        scale = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
        for step, r in zip(steps, residuals):
            if scale > 0 and r / scale > SPIKE_ROBUST_Z:
                flagged.setdefault(step, "logged loss over its trend")
    if not flagged:
        return []
    steps = sorted(flagged)
    evidence = {"steps": steps[:20], "count": len(steps), "sources": sorted(set(flagged.values()))}
    summary = f"{len(steps)} loss spike(s) at step(s) {', '.join(map(str, steps[:8]))}{' ...' if len(steps) > 8 else ''}"
    return [Finding("loss_spike", (steps[0], steps[-1]), evidence, summary)]


def grad_norm_growth(rows: list[dict]) -> list[Finding]:
    """After the first quarter of the run (early gradients are large and falling), the median grad norm
    of the last quarter over GRAD_GROWTH times the first's, rising quarter by quarter."""
    steps, norms = _series(rows, "grad_norm")
    steps, norms = steps[len(norms) // 4:], norms[len(norms) // 4:]
    if len(norms) < 12:
        return []
    quarter = len(norms) // 4
    medians = [statistics.median(norms[i * quarter:(i + 1) * quarter]) for i in range(3)]
    medians.append(statistics.median(norms[3 * quarter:]))
    rising = all(b >= a for a, b in zip(medians, medians[1:]))
    if not rising or medians[-1] < GRAD_GROWTH * medians[0]:
        return []
    evidence = {"quarter_medians": medians, "growth": medians[-1] / medians[0]}
    summary = f"grad norm median {medians[0]:.3g} -> {medians[-1]:.3g} ({medians[-1] / medians[0]:.1f}x) quarter by quarter"
    return [Finding("grad_norm_growth", (steps[0], steps[-1]), evidence, summary)]


# ----------------------------------------------------------------------------- ranks, memory, MFU


def stragglers(rows: list[dict], events: list[dict]) -> list[Finding]:
    """The trainer's straggler events (train/rank_watch.py), one finding per rank, covering its events
    and the logged steps after them where it stayed the slowest rank."""
    by_rank: dict[int, list[dict]] = {}
    for e in events:
        if e.get("event") == "straggler":
            by_rank.setdefault(int(e["rank"]), []).append(e)
    findings = []
    for rank, found in sorted(by_rank.items()):
        worst = max(e["slower_by"] for e in found)
        host = found[0].get("host")
        evidence = {"rank": rank, "host": host, "slower_by": worst, "events": len(found),
                    "busy_s": found[-1].get("busy_s"), "others_median_s": found[-1].get("others_median_s")}
        summary = (f"rank {rank} ({host}) busy up to {100 * worst:.0f}% longer than the other ranks' median, "
                   f"{found[0].get('logs')} logged steps in a row")
        last = found[-1]["step"]
        for r in rows:
            if r["step"] > last and r.get("rank/slowest") == rank:
                last = r["step"]
            elif r["step"] > last:
                break
        findings.append(Finding("straggler", (found[0]["step"], last), evidence, summary))
    return findings


def memory_growth(rows: list[dict]) -> list[Finding]:
    """memory_climb (train/step_timer.py, the rule the trainer's event uses) over every window of
    CLIMB_WINDOW logged values after the first WARMUP_LOGS; overlapping climbing windows are one finding."""
    key = "memory/allocated_gb" if any("memory/allocated_gb" in r for r in rows) else "memory/rss_gb"
    steps, values = _series(rows, key)
    points = list(zip(steps, values))[WARMUP_LOGS:]
    stretches: list[list[int]] = []
    for i in range(len(points) - CLIMB_WINDOW + 1):
        if memory_climb(points[i:i + CLIMB_WINDOW]) is None:
            continue
        if stretches and i <= stretches[-1][1]:
            stretches[-1][1] = i + CLIMB_WINDOW - 1
        else:
            stretches.append([i, i + CLIMB_WINDOW - 1])
    findings = []
    for first, last in stretches:
        (s0, v0), (s1, v1) = points[first], points[last]
        evidence = {"field": key, "start_gb": v0, "end_gb": v1, "mb_per_step": 1000 * (v1 - v0) / max(s1 - s0, 1)}
        summary = f"{key} {v0:.2f} -> {v1:.2f} GB over steps {s0}-{s1} ({evidence['mb_per_step']:.1f} MB/step)"
        findings.append(Finding("memory_growth", (s0, s1), evidence, summary))
    return findings


def low_mfu(rows: list[dict], matmul_tflops: float) -> list[Finding]:
    """The median achieved TFLOP/s per device (first log line left out) under LOW_MFU_SHARE of the
    device's measured matmul rate."""
    steps, achieved = _series(rows[1:], "tflops_per_device")
    if not achieved:
        return []
    median = statistics.median(achieved)
    share = median / matmul_tflops
    if share >= LOW_MFU_SHARE:
        return []
    evidence = {"tflops_per_device": median, "matmul_tflops": matmul_tflops, "share": share}
    summary = (f"{median:.3g} TFLOP/s per device, {100 * share:.1f}% of this device's measured matmul rate "
               f"({matmul_tflops:.3g} TFLOP/s)")
    return [Finding("low_mfu", (steps[0], steps[-1]), evidence, summary)]


__all__ = ["KINDS", "Finding", "diagnose", "smooth_trend", "lag1_autocorrelation"]
