"""Compute: dense matmul FLOP/s per precision at a large square shape and at the recipe's own GEMM
shapes, against the device's spec peak, and which precision is faster for this model.

Measured, not assumed: on H100 SmolLM3 found bf16 faster than fp8 at their shapes, because a GEMM
whose arithmetic intensity is below the device's FLOP/byte ratio waits on HBM, not on the tensor
cores. fp8 times include casting the activation to fp8, which a training step pays every time.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from smoltrain.doctor.report import INFO, OK, WARN, Check, by_share
from smoltrain.doctor.timing import Budget, time_op

GPU_PRECISIONS = ("bf16", "fp16", "tf32", "fp32", "fp8")
CPU_PRECISIONS = ("fp32", "bf16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32}
BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4, "fp8": 1}
# A large bf16 GEMM reaches 72-77% of an H100's 989 TFLOP/s spec (714-758 measured in the playbook),
# fp32 and tf32 similar shares; below 55% something is wrong (clocks, power, a bad part).
OK_SHARE, WARN_SHARE = 0.55, 0.35


@contextmanager
def fp32_matmul_mode(precision: str):
    """tf32 tensor cores for float32 matmuls only while measuring "tf32"; "fp32" is plain IEEE."""
    if precision not in ("tf32", "fp32"):
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def fp8_supported(device: torch.device) -> str | None:
    """None when fp8 GEMMs run here, else why not."""
    if device.type != "cuda":
        return "no fp8 GEMM on CPU"
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if torch.version.cuda is None:  # ROCm builds name the fp8 types differently
        return "fp8 measured on CUDA builds only"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return "fp8 tensor cores need compute capability 8.9 (Ada, Hopper) or newer"
    return None


def matmul_fn(m: int, k: int, n: int, precision: str, device: torch.device):
    """A zero-argument callable doing one [m, k] x [n, k]^T GEMM (nn.Linear's layout) in `precision`."""
    g = torch.Generator(device=device).manual_seed(0)
    if precision == "fp8":
        a = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device=device, generator=g).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        # _scaled_mm wants the second operand column-major: w.t() of a row-major [n, k] is exactly that.
        return lambda: torch._scaled_mm(a.to(torch.float8_e4m3fn), w.t(), scale_a=one, scale_b=one,
                                        out_dtype=torch.bfloat16)
    dtype = DTYPES[precision]
    a = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g)
    return lambda: F.linear(a, w)


def time_matmul(m: int, k: int, n: int, precision: str, device: torch.device, seconds: float) -> float:
    """Median seconds of one GEMM."""
    fn = matmul_fn(m, k, n, precision, device)
    with fp32_matmul_mode(precision):
        return time_op(fn, seconds, device)


def recipe_shapes(model, tokens: int) -> list[dict]:
    """The GEMMs of one micro-batch forward: (name, m, k, n, how many per forward)."""
    h, hd, layers = model.hidden_size, model.resolved_head_dim, model.num_layers
    shapes = [
        ("q_proj", h, model.num_heads * hd, layers),
        ("k_proj, v_proj", h, model.num_kv_heads * hd, 2 * layers),
        ("o_proj", model.num_heads * hd, h, layers),
        ("gate_proj, up_proj", h, model.intermediate_size, 2 * layers),
        ("down_proj", model.intermediate_size, h, layers),
        ("lm_head", h, model.vocab_size, 1),
    ]
    return [{"name": name, "m": tokens, "k": k, "n": n, "count": count} for name, k, n, count in shapes]


def trainer_precision(config, device: torch.device) -> str:
    """The matmul precision the trainer will use: the trainer's own resolution (train.precision auto:
    bf16 on CUDA; on a CPU what is faster there for the model)."""
    from smoltrain.train.distributed import resolve_precision

    return resolve_precision(config.train.precision, device, config.model,
                             config.train.micro_batch_size * config.data.seq_len)


def _error(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def measure(device: torch.device, budget: Budget, shapes: list[dict] | None = None) -> dict:
    """Every precision at the square shape, then bf16 and fp8 (GPU) or fp32 and bf16 (CPU) at each
    recipe shape. Rows beyond the budget are not run: the time scales linearly with them."""
    cuda = device.type == "cuda"
    precisions = GPU_PRECISIONS if cuda else CPU_PRECISIONS
    no_fp8 = fp8_supported(device)
    n = budget.matmul_size
    square = {}
    for p in precisions:
        if p == "fp8" and no_fp8:
            square[p] = {"error": no_fp8}
            continue
        try:
            seconds = time_matmul(n, n, n, p, device, budget.measure_s)
            square[p] = {"seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}
        except (RuntimeError, NotImplementedError) as e:  # a kernel missing on this device or build
            square[p] = {"error": _error(e)}
    results = []
    for shape in shapes or []:
        # At most the rows of one square GEMM's FLOPs (a 3B model's lm_head on a CPU would take minutes),
        # at least 64 rows; the time of the whole micro-batch is scaled up from them.
        flop_rows = max(64, n**3 // (shape["k"] * shape["n"]) // 16 * 16)
        rows = min(shape["m"], budget.recipe_rows, flop_rows)
        row = dict(shape, rows_timed=rows, seconds={}, tflops={})
        for p in ("bf16", "fp8") if cuda else CPU_PRECISIONS:
            if p == "fp8" and (no_fp8 or any(d % 16 for d in (rows, shape["k"], shape["n"]))):
                continue  # _scaled_mm needs every dimension a multiple of 16
            try:
                t = time_matmul(rows, shape["k"], shape["n"], p, device, budget.measure_s / 2)
            except (RuntimeError, NotImplementedError) as e:
                row.setdefault("errors", {})[p] = _error(e)
                continue
            row["seconds"][p] = t * shape["m"] / rows  # the whole micro-batch
            row["tflops"][p] = 2 * rows * shape["k"] * shape["n"] / t / 1e12
        results.append(row)
    out = {"square_size": n, "square": square, "recipe": results}
    threads = torch.get_num_threads()
    if not cuda and threads > 1:
        out["threads"] = _threads_probe(results[0] if results else None, budget, device, threads)
    return out


def _threads_probe(shape: dict | None, budget: Budget, device: torch.device, threads: int) -> dict:
    """fp32 FLOP/s of the recipe's first GEMM (else a 256^3 one) with this process's threads and with
    one: small GEMMs on a busy or oversubscribed CPU can run many times slower on several threads."""
    m, k, n = (shape["rows_timed"], shape["k"], shape["n"]) if shape else (256, 256, 256)
    rates = {}
    for count in (threads, 1):
        torch.set_num_threads(count)
        try:
            rates[count] = 2 * m * k * n / time_matmul(m, k, n, "fp32", device, budget.measure_s / 2) / 1e12
        finally:
            torch.set_num_threads(threads)
    return {"shape": [m, k, n], "threads": threads, "tflops": rates[threads], "tflops_one_thread": rates[1]}


def recipe_rate(measured: dict, precision: str) -> float | None:
    """FLOP/s over all of the recipe's GEMMs of one forward in `precision` (None without them)."""
    flops = seconds = 0.0
    for row in measured["recipe"]:
        if precision not in row["seconds"]:
            return None
        flops += 2 * row["m"] * row["k"] * row["n"] * row["count"]
        seconds += row["seconds"][precision] * row["count"]
    return flops / seconds if seconds else None


def arithmetic_intensity(m: int, k: int, n: int, input_bytes: int, output_bytes: int = 2) -> float:
    """FLOPs per byte moved by one GEMM that reads both operands and writes the result once."""
    return 2 * m * k * n / (input_bytes * (m * k + k * n) + output_bytes * m * n)


def _rate(tflops: float, cuda: bool) -> str:
    return f"{tflops:,.0f} TFLOP/s" if cuda else f"{1000 * tflops:,.1f} GFLOP/s"


def judge(measured: dict, spec: dict | None, cuda: bool, precision: str) -> list[Check]:
    checks = []
    n = measured["square_size"]
    for p, r in measured["square"].items():
        name = f"{p} matmul {n}x{n}x{n}"
        if "error" in r:
            checks.append(Check("compute", name, "not available", "", INFO, r["error"]))
            continue
        peak = spec.get(p) if spec else None
        if peak:
            share = r["tflops"] / peak
            status = by_share(r["tflops"], peak, OK_SHARE, WARN_SHARE)
            advice = "" if status == OK else (
                f"{100 * share:.0f}% of spec: check clocks, power cap and temperature (health below); "
                "a large bf16 GEMM reaches 70-80% on a healthy H100")
            checks.append(Check("compute", name, f"{_rate(r['tflops'], cuda)} ({100 * share:.0f}% of spec)",
                                f"spec {peak:g} TFLOP/s dense", status, advice, {"value": r["tflops"], "share": share, **r}))
        else:
            reference = "no spec peak for this device" if cuda else "no spec peak for CPUs"
            checks.append(Check("compute", name, _rate(r["tflops"], cuda), reference, INFO, "", {"value": r["tflops"], **r}))
    probe = measured.get("threads")
    if probe:
        speedup = probe["tflops_one_thread"] / probe["tflops"]
        slower = speedup > 1.1
        checks.append(Check(
            "compute", f"threads at {'x'.join(map(str, probe['shape']))}",
            f"{probe['threads']} threads {_rate(probe['tflops'], cuda)}, 1 thread {_rate(probe['tflops_one_thread'], cuda)}",
            "more threads should not be slower", WARN if slower else OK,
            f"1 thread is {speedup:.1f}x faster: the cores are oversubscribed or busy; set OMP_NUM_THREADS=1"
            if slower else "", {"value": probe["tflops"], **probe}))
    if not measured["recipe"]:
        return checks
    ridge = spec["bf16"] / spec["memory_tb_s"] if spec else None  # FLOP per byte where a GEMM turns compute-bound
    for row in measured["recipe"]:
        m, k, n = row["m"], row["k"], row["n"]
        rates = ", ".join(f"{p} {_rate(t, cuda)}" for p, t in row["tflops"].items())
        intensity = arithmetic_intensity(m, k, n, BYTES["bf16"])
        if ridge:
            bound = "compute-bound" if intensity >= ridge else "memory-bound"
            reference = f"bf16 intensity {intensity:,.0f} FLOP/B vs ridge {ridge:,.0f}: {bound}"
        else:
            reference = f"bf16 intensity {intensity:,.0f} FLOP/B"
        shape = f"{row['name']} {m}x{k}x{n}" + (f" (x{row['count']})" if row["count"] > 1 else "")
        if row["rows_timed"] < m:
            rates += f" ({row['rows_timed']} of {m} rows timed)"
        checks.append(Check("compute", shape, rates, reference, INFO, "",
                            {"intensity_flop_per_byte": intensity, "ridge_flop_per_byte": ridge, **row}))
    candidates = ("bf16", "fp8") if cuda else CPU_PRECISIONS
    per_step = {p: sum(r["seconds"][p] * r["count"] for r in measured["recipe"])
                for p in candidates if all(p in r["seconds"] for r in measured["recipe"])}
    if len(per_step) == 2:
        fast, slow = sorted(per_step, key=per_step.get)
        speedup = per_step[slow] / per_step[fast]
        figure = (f"{fast}: {1000 * per_step[fast]:.2f} ms vs {slow} {1000 * per_step[slow]:.2f} ms of GEMMs per "
                  f"micro-batch forward ({speedup:.2f}x)")
        advice = ""
        if fast != precision and speedup > 1.1:
            advice = (f"the trainer uses {precision}; {fast} matmuls are {speedup:.1f}x faster at this model's shapes"
                      + (" (train.precision: bf16)" if fast == "bf16" else ""))
        elif fast == precision:
            advice = f"{precision} (the trainer's) is the faster choice here"
        checks.append(Check("compute", "faster precision for this model", figure,
                            "the playbook: bf16 beat fp8 at SmolLM3's shapes on H100", OK, advice,
                            {"seconds_per_forward": per_step, "faster": fast, "speedup": speedup}))
    return checks
