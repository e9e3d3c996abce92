"""Collectives: all-reduce, all-gather and reduce-scatter bus bandwidth over a sweep of sizes, within
a node and across nodes (NCCL on GPUs, gloo on CPU), and a send/recv ring so a slow rank or link
stands out.

Bus bandwidth is nccl-tests' (its PERFORMANCE.md): algbw = S / t with S the full buffer (all-reduce:
the tensor; all-gather: the gathered output; reduce-scatter: the input), busbw = algbw x 2(n-1)/n for
all-reduce and x (n-1)/n for the other two, which makes it comparable to the link's speed whatever
the rank count. t is the slowest rank's: a collective is done when its last rank is.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from smoltrain.doctor.health import slow_ranks
from smoltrain.doctor.report import INFO, Check, by_share
from smoltrain.doctor.timing import Budget, synchronize

OPS = ("all_reduce", "all_gather", "reduce_scatter")
BUS_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
}
# The playbook's H100 nodes (8 GPUs, NVLink/NVSwitch; 400G InfiniBand between nodes), all-reduce busbw.
REFERENCE_GB_S = {"within a node": 480.0, "across nodes": 335.0}
REFERENCE_DEVICES = ("H100", "H200")
MIN_SIZE = 32 * 2**10
SLOW_LINK = 0.25  # a send/recv ring rank more than 25% below its peers is flagged


def bus_bandwidth(op: str, size_bytes: int, seconds: float, world: int) -> tuple[float, float]:
    """(algbw, busbw) in bytes/s, nccl-tests' definitions."""
    algbw = size_bytes / seconds
    return algbw, algbw * BUS_FACTOR[op](world)


def sweep_sizes(max_bytes: int, world: int) -> list[int]:
    """Sizes from max_bytes down by 8x to MIN_SIZE, each divisible into world float32 chunks."""
    sizes, size = [], max_bytes
    while size >= MIN_SIZE or not sizes:
        sizes.append(max(4 * world, size // (4 * world) * 4 * world))
        size //= 8
    return sorted(set(sizes))


def _ops(buffer: torch.Tensor, chunk: torch.Tensor, group):
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return {
        "all_reduce": lambda: dist.all_reduce(buffer, group=group),
        "all_gather": lambda: gather(buffer, chunk, group=group),
        "reduce_scatter": lambda: scatter(chunk, buffer, group=group),
    }


def _slowest(seconds: float, device: torch.device, group) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()


def _time_collective(fn, device: torch.device, group, seconds: float) -> float:
    """Seconds per call on this rank; every rank of `group` runs the same number of calls."""
    fn()
    synchronize(device)
    dist.barrier(group=group)
    start = time.perf_counter()
    fn()
    synchronize(device)
    one = _slowest(time.perf_counter() - start, device, group)
    iters = max(1, min(100, int(seconds / max(one, 1e-9))))
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def node_groups(hosts: list[str]) -> list[list[int]]:
    """Ranks per host, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        groups.setdefault(host, []).append(rank)
    return list(groups.values())


def measure(device: torch.device, budget: Budget, hosts: list[str]) -> dict:
    """Every rank runs this together. The sweep over the world, plus within each node when there are
    several nodes with several ranks each; then a send/recv ring at the largest size."""
    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = node_groups(hosts)
    groups = [("within a node" if len(nodes) == 1 else "across nodes", None, list(range(world)))]
    if len(nodes) > 1 and max(map(len, nodes)) > 1:
        mine = None
        for members in nodes:  # every rank creates every group, in the same order
            g = dist.new_group(members)
            if rank in members:
                mine = (g, members)
        groups.append(("within a node", *mine))
    max_bytes = int(budget.collective_max_mb * 2**20)
    rows = []
    for label, group, members in groups:
        n = len(members)
        if n < 2:
            continue
        for size in sweep_sizes(max_bytes, n):
            buffer = torch.ones(size // 4, dtype=torch.float32, device=device)
            chunk = torch.ones(size // 4 // n, dtype=torch.float32, device=device)
            for op, fn in _ops(buffer, chunk, group).items():
                seconds = _time_collective(fn, device, group, budget.collective_s)
                rows.append({"group": label, "members": members, "op": op, "size_bytes": size, "time_s": seconds})
    size = sweep_sizes(max_bytes, world)[-1]
    send = torch.ones(size // 4, dtype=torch.float32, device=device)
    recv = torch.empty_like(send)

    def ring():
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    ring_s = _time_collective(ring, device, None, budget.collective_s)
    return {"backend": dist.get_backend(), "sweep": rows, "ring": {"size_bytes": size, "time_s": ring_s}}


def summarize(per_rank: list[dict]) -> list[dict]:
    """The sweep table: per (group, op, size) the slowest rank's time and nccl-tests bandwidths."""
    cells: dict[tuple, dict] = {}
    for measured in per_rank:
        for row in measured["sweep"]:
            key = (row["group"], row["op"], row["size_bytes"])
            cell = cells.setdefault(key, {"group": row["group"], "op": row["op"], "size_bytes": row["size_bytes"],
                                          "ranks": len(row["members"]), "time_s": 0.0})
            cell["time_s"] = max(cell["time_s"], row["time_s"])
    for cell in cells.values():
        algbw, busbw = bus_bandwidth(cell["op"], cell["size_bytes"], cell["time_s"], cell["ranks"])
        cell["algbw_gb_s"], cell["busbw_gb_s"] = algbw / 1e9, busbw / 1e9
    return list(cells.values())


def judge(per_rank: list[dict] | None, hosts: list[str], device_name: str) -> tuple[list[Check], list[dict]]:
    if per_rank is None:
        return [Check("collectives", "collectives", "1 rank: nothing to measure", "", INFO,
                      "run under torchrun --nproc_per_node=N (and --nnodes) to measure NCCL / gloo bandwidth")], []
    sweep = summarize(per_rank)
    checks = []
    per_node = max(map(len, node_groups(hosts)))
    for group in dict.fromkeys(row["group"] for row in sweep):
        for op in OPS:
            rows = [r for r in sweep if r["group"] == group and r["op"] == op]
            top = max(rows, key=lambda r: r["size_bytes"])
            busbw = top["busbw_gb_s"]
            name = f"{op.replace('_', '-')} ({group}, {top['ranks']} ranks)"
            figure = f"busbw {busbw:,.3g} GB/s at {top['size_bytes'] / 2**20:g} MiB (algbw {top['algbw_gb_s']:,.3g})"
            reference = REFERENCE_GB_S[group] if op == "all_reduce" else None
            applies = (reference and any(k in device_name for k in REFERENCE_DEVICES)
                       and (group == "across nodes" or per_node >= 8))
            if applies:
                status = by_share(busbw, reference, 0.7, 0.35)
                advice = "" if status == "OK" else ("check NCCL_* settings, NVLink/InfiniBand health (nvidia-smi topo -m) "
                                                    "and the slow-rank checks")
                checks.append(Check("collectives", name, figure, f"playbook H100: ~{reference:g} GB/s", status, advice,
                                    {"value": busbw, **top}))
            else:
                reference_text = ("playbook H100 all-reduce: ~480 GB/s in a node, 320-350 across nodes"
                                  if op == "all_reduce" else "nccl-tests bus bandwidth")
                checks.append(Check("collectives", name, figure, reference_text, INFO, "", {"value": busbw, **top}))
    ring = [m["ring"]["size_bytes"] / m["ring"]["time_s"] / 1e9 for m in per_rank]
    checks.append(slow_ranks(ring, hosts, "send/recv ring", "GB/s", "collectives", SLOW_LINK))
    return checks, sweep
