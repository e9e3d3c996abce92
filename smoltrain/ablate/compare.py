"""Comparison against the baseline: seed-to-seed noise, a verdict per variant and metric, and the
playbook's parameter-count check.

Noise is the pooled standard deviation across seeds of every arm (baseline and variants share one
seed-to-seed spread, so 2 seeds x 3 arms give 3 degrees of freedom instead of 1). A difference is
a finding when it exceeds `noise_sigma` standard errors of the difference,
s_pooled x sqrt(1/n_baseline + 1/n_variant); otherwise it is "within noise". With a single seed
per arm there is no spread to compare against and the verdict says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from smoltrain.report.run import lower_is_better

BETTER, WORSE, WITHIN_NOISE, NO_SPREAD = "better", "worse", "within noise", "no seed spread"


@dataclass
class Verdict:
    variant: str
    metric: str
    baseline_mean: float
    variant_mean: float
    difference: float  # variant - baseline, in the metric's units
    threshold: float | None  # |difference| must exceed this to count (None: no spread to measure)
    seed_std: float | None  # pooled seed-to-seed standard deviation
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def sample_std(values: Sequence[float]) -> float:
    """Unbiased (n - 1) standard deviation; 0 for a single value."""
    if len(values) < 2:
        return 0.0
    spread, _ = pooled_std([values])
    return spread


def pooled_std(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(pooled standard deviation, degrees of freedom) over groups that share one noise level."""
    squares, dof = 0.0, 0
    for values in groups:
        if len(values) >= 2:
            # Shifted by the first value: identical seeds give exactly 0, not rounding noise.
            shifted = [v - values[0] for v in values]
            m = mean(shifted)
            squares += sum((v - m) ** 2 for v in shifted)
            dof += len(values) - 1
    return (math.sqrt(squares / dof) if dof else 0.0), dof


def compare(
    results: Mapping[str, Mapping[str, Sequence[float]]],
    baseline: str = "baseline",
    noise_sigma: float = 2.0,
) -> list[Verdict]:
    """results[arm][metric] = one value per seed -> a Verdict for every (variant, metric) the
    baseline also has. Direction comes from the metric's name (loss/bpb: lower is better)."""
    if baseline not in results:
        raise ValueError(f"no results for the baseline arm {baseline!r}")
    verdicts = []
    for metric, base_values in results[baseline].items():
        base_values = [v for v in base_values if math.isfinite(v)]
        if not base_values:
            continue
        arms = [[v for v in results[arm].get(metric, []) if math.isfinite(v)] for arm in results]
        spread, dof = pooled_std([a for a in arms if a])
        for arm, per_metric in results.items():
            if arm == baseline or metric not in per_metric:
                continue
            values = [v for v in per_metric[metric] if math.isfinite(v)]
            if not values:
                continue
            difference = mean(values) - mean(base_values)
            if dof == 0:
                threshold, verdict = None, NO_SPREAD
            else:
                threshold = noise_sigma * spread * math.sqrt(1 / len(base_values) + 1 / len(values))
                if abs(difference) <= threshold:
                    verdict = WITHIN_NOISE
                else:
                    improved = difference < 0 if lower_is_better(metric) else difference > 0
                    verdict = BETTER if improved else WORSE
            verdicts.append(Verdict(arm, metric, mean(base_values), mean(values), difference, threshold,
                                    spread if dof else None, verdict))
    return verdicts


def parameter_warnings(counts: Mapping[str, int], baseline: str = "baseline", tolerance: float = 0.05) -> dict[str, str]:
    """variant -> warning for every variant whose parameter count differs from the baseline's by
    more than `tolerance` (relative): the playbook compares architectures at equal parameters."""
    base = counts[baseline]
    warnings = {}
    for arm, count in counts.items():
        if arm == baseline:
            continue
        relative = (count - base) / base
        if abs(relative) > tolerance:
            warnings[arm] = (
                f"{arm} has {count:,} parameters, {relative:+.1%} vs the baseline's {base:,} "
                f"(more than {tolerance:.0%}): adjust layers or width so the comparison is at equal parameters"
            )
    return warnings
