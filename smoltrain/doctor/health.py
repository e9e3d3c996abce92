"""Sustained load and health: N seconds of matmuls per device, FLOP/s over time, NVML clocks,
temperature, power and throttle reasons, and the devices that run slower than their peers.

The incident this catches: in SmolLM3's run one thermally throttled GPU dropped all-reduce bandwidth
across 16 nodes from ~350 to ~100 GB/s, because every collective waits for the slowest rank. A short
benchmark on a cold GPU looks fine; the slowdown shows after tens of seconds of heat.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from smoltrain.doctor.compute import fp32_matmul_mode, matmul_fn
from smoltrain.doctor.report import FAIL, INFO, OK, WARN, Check
from smoltrain.doctor.timing import Budget, synchronize

WINDOWS = 10  # rate samples over the run
SLOWDOWN = 0.9  # last third below 90% of the first third: the device slows under load
SLOW_PEER = 0.1  # a device more than 10% below the median of its peers is flagged
HOT_C = 85  # H100 slows its clocks from ~87 C; sustained >85 C under load means poor cooling

# NVML clock event ("throttle") reason bits, nvml.h; idle, application clocks and sync boost are benign.
THROTTLE_REASONS = {
    0x4: "software power cap",
    0x8: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}
BAD_REASONS = 0x8 | 0x20 | 0x40 | 0x80  # a power cap under full load is normal; these are not


def nvml_handle(device: torch.device):
    """The NVML handle of a CUDA device (found by PCI bus id, so CUDA_VISIBLE_DEVICES is honoured),
    or None without a GPU or without `nvidia-ml-py` (pip install 'smoltrain[gpu]')."""
    if device.type != "cuda" or torch.version.cuda is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        p = torch.cuda.get_device_properties(device)
        if not hasattr(p, "pci_bus_id"):  # older torch: NVML and CUDA agree on order without CUDA_VISIBLE_DEVICES
            return None if os.environ.get("CUDA_VISIBLE_DEVICES") else pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        return pynvml.nvmlDeviceGetHandleByPciBusId(f"{p.pci_domain_id:08x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0")
    except Exception:  # noqa: BLE001 (not installed, no driver access, an old driver): health figures are then absent
        return None


def nvml_sample(handle) -> dict:
    import pynvml

    reasons_fn = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return {
        "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000,
        "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000,
        "throttle_reasons": int(reasons_fn(handle)),
    }


def measure(device: torch.device, budget: Budget, precision: str) -> dict:
    """FLOP/s of back-to-back square GEMMs in WINDOWS windows of budget.sustained_s / WINDOWS."""
    n = budget.matmul_size
    fn = matmul_fn(n, n, n, precision, device)
    flops = 2 * n**3
    handle = nvml_handle(device)
    window_s = budget.sustained_s / WINDOWS
    rates, samples = [], []
    with fp32_matmul_mode(precision):
        fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        chunk = max(1, int(window_s / 10 / max(time.perf_counter() - start, 1e-9)))  # ~10 syncs per window
        for _ in range(WINDOWS):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < window_s:
                for _ in range(chunk):
                    fn()
                synchronize(device)
                calls += chunk
            rates.append(calls * flops / (time.perf_counter() - start) / 1e12)
            if handle is not None:
                samples.append(nvml_sample(handle))
    return {"precision": precision, "size": n, "seconds": budget.sustained_s, "tflops": rates, "nvml": samples}


def _rate(tflops: float, cuda: bool) -> str:
    return f"{tflops:,.0f} TFLOP/s" if cuda else f"{1000 * tflops:,.1f} GFLOP/s"


def judge(measured: dict, cuda: bool) -> list[Check]:
    rates = measured["tflops"]
    third = max(1, len(rates) // 3)
    first, last = statistics.median(rates[:third]), statistics.median(rates[-third:])
    ratio = last / first
    status = OK if ratio >= SLOWDOWN else WARN
    checks = [Check(
        "health", f"sustained {measured['precision']} matmul, {measured['seconds']:g} s",
        f"median {_rate(statistics.median(rates), cuda)}; last third at {100 * ratio:.0f}% of the first",
        f"no slowdown below {100 * SLOWDOWN:.0f}%", status,
        "" if status == OK else ("the device slows under load: thermal or power throttling (see clocks below)" if cuda
                                 else "the rate fell during the run: other processes share these cores"),
        {"value": statistics.median(rates), "tflops": rates, "last_over_first": ratio})]
    samples = measured["nvml"]
    if not samples:
        if cuda:
            checks.append(Check("health", "clocks, temperature, power", "not read", "", INFO,
                                "pip install 'smoltrain[gpu]' (nvidia-ml-py) for clocks, temperature and throttle reasons"))
        return checks
    seen = 0
    for s in samples:
        seen |= s["throttle_reasons"]
    reasons = [text for bit, text in THROTTLE_REASONS.items() if seen & bit]
    hottest = max(s["temperature_c"] for s in samples)
    lowest_clock = min(s["sm_clock_mhz"] for s in samples)
    max_clock = samples[-1]["max_sm_clock_mhz"]
    power = max(s["power_w"] for s in samples)
    status = FAIL if seen & BAD_REASONS else WARN if hottest > HOT_C else OK
    advice = ""
    if seen & BAD_REASONS:
        advice = "throttled by heat or a hardware slowdown: drain this node and check its cooling (GPU Fryer's finding)"
    elif hottest > HOT_C:
        advice = f"running at {hottest} C under load: check airflow before a multi-day job"
    checks.append(Check(
        "health", "clocks, temperature, power",
        f"SM clock down to {lowest_clock} of {max_clock} MHz, up to {hottest} C, {power:.0f} of "
        f"{samples[-1]['power_limit_w']:.0f} W; throttle reasons: {', '.join(reasons) or 'none'}",
        f"no thermal or hardware slowdown, under {HOT_C} C", status, advice,
        {"value": float(lowest_clock), "samples": samples}))
    return checks


def slow_ranks(rates: list[float], hosts: list[str], what: str, unit: str, section: str = "health",
               tolerance: float = SLOW_PEER) -> Check:
    """One check over all ranks: FAIL naming each rank more than `tolerance` below the median of
    its peers (the other ranks), OK when none is."""
    slow = []
    for r, rate in enumerate(rates):
        peers = statistics.median(rates[:r] + rates[r + 1:])
        if rate < (1 - tolerance) * peers:
            slow.append(f"rank {r} ({hosts[r]}) at {rate:.4g} {unit}, {100 * (1 - rate / peers):.0f}% below its peers")
    lo, hi = min(rates), max(rates)
    figure = "; ".join(slow) if slow else f"{len(rates)} ranks from {lo:.4g} to {hi:.4g} {unit}"
    advice = ""
    if slow:
        advice = ("every collective waits for the slowest rank (one throttled GPU took SmolLM3's all-reduce from "
                  "~350 to ~100 GB/s): exclude its node from the job")
    return Check(section, f"slow ranks ({what})", figure, f"within {100 * tolerance:.0f}% of the median of its peers",
                 FAIL if slow else OK, advice, {"per_rank": rates, "slow": slow})
