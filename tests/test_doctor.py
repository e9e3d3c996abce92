"""`smoltrain doctor` on CPU: every section in one process and under 2 gloo ranks (one of them made
slow, which must be flagged), nccl-tests' bus-bandwidth formulas on fixed timings, network file
systems from a mounts table, --strict exit codes and one-line errors for bad arguments.

Sizes are tiny (a 32x32 matmul, 1 MiB reads): these tests check what is measured and how it is
judged, never how fast this machine is (timings live in bench/doctor_honesty.py).
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from rich.console import Console
from spawn_helpers import leaves_without_teardown

from smoltrain import doctor
from smoltrain.cli import main
from smoltrain.config import ModelConfig, load_config
from smoltrain.doctor import collectives, compute, health, storage
from smoltrain.doctor.report import FAIL, OK, SECTIONS, WARN
from smoltrain.doctor.timing import Budget
from smoltrain.model.flops import parameter_counts
from smoltrain.train.metrics import device_spec
from smoltrain.train.plan import plan
from tests.synthetic_shards import write_random_documents

TINY = Budget(matmul_size=32, measure_s=0.01, recipe_rows=16, copy_mb=1, sustained_s=0.05, collective_max_mb=0.0625,
              collective_s=0.005, storage_mb=1, storage_s=0.02, write_mb=1, loader_s=0.05)
SLOW_SLEEP_S = 0.003  # per 32x32 matmul (~5 us): the simulated throttled rank runs ~500x slower


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("doctor")
    write_random_documents(root / "shards", "a", 1, 256, num_tokens=20000)
    config = {
        "model": dict(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_seq_len=32),
        "data": {"sources": {"a": str(root / "shards")}, "seq_len": 32},
        "train": dict(out_dir=str(root / "run"), max_steps=10, global_batch_tokens=128, micro_batch_size=2,
                      device="cpu", keep_checkpoints=2),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def quiet() -> Console:
    return Console(file=io.StringIO(), width=150)


# ----------------------------------------------------------------------------- one process


def test_every_section_runs_in_one_process_and_the_json_holds_every_figure(recipe, tmp_path):
    out = tmp_path / "doctor.json"
    console = quiet()
    result = doctor.run(str(recipe), json_out=str(out), budget=TINY, console=console)
    assert {c["section"] for c in result["checks"]} == set(SECTIONS)
    assert result["verdict"] in (OK, WARN, FAIL) and sum(result["counts"].values()) == len(result["checks"])
    assert json.loads(out.read_text())["checks"] == result["checks"]
    printed = console.file.getvalue()
    assert all(section in printed for section in SECTIONS) and f"verdict: {result['verdict']}" in printed

    config = load_config(str(recipe))
    mine = result["measurements"][0]
    # The recipe's GEMMs are exactly the model's matmul parameters (lm_head included) x tokens.
    tokens = config.train.micro_batch_size * config.data.seq_len
    gemm_flops = sum(2 * r["m"] * r["k"] * r["n"] * r["count"] for r in mine["compute"]["recipe"])
    assert gemm_flops == 2 * tokens * parameter_counts(config.model)["matmul"]
    # Storage read every byte of the (small) shard files, cold.
    folder = str(Path(config.data.sources["a"]))
    probe = mine["storage"]["data"][folder]
    assert probe["cache"] == "fadvise"
    assert probe["read_bytes"] == sum(Path(f).stat().st_size for f in probe["files"])
    # The loader's need is the planner's tokens/s at the measured fp32 rate (no spec peak on CPU).
    checks = {c["name"]: c for c in result["checks"]}
    rate = compute.recipe_rate(mine["compute"], "fp32")
    expected = plan(config, gpus=1, peak_tflops=rate / 1e12)
    assert checks["loader tokens/s per node"]["values"]["need"] == pytest.approx(expected["tokens_per_s_per_gpu"])
    assert checks["memory per device"]["values"]["value"] == pytest.approx(expected["memory_per_device_gb"]["total"])
    assert checks["tokens/s upper bound per device"]["values"]["value"] == pytest.approx(rate / expected["flops_per_token"])
    assert checks["collectives"]["status"] == "INFO"  # one process: nothing to measure, said so


def test_arithmetic_intensity_and_recipe_shapes_by_hand():
    # 4096^3 bf16: 2 n^3 FLOPs over 3 n^2 two-byte matrices = n / 3.
    assert compute.arithmetic_intensity(4096, 4096, 4096, 2) == pytest.approx(4096 / 3)
    shapes = {s["name"]: s for s in compute.recipe_shapes(ModelConfig(), tokens=8192)}  # SmolLM2-135M's shape
    assert (shapes["q_proj"]["k"], shapes["q_proj"]["n"]) == (576, 576)
    assert (shapes["k_proj, v_proj"]["n"], shapes["k_proj, v_proj"]["count"]) == (192, 60)
    assert (shapes["down_proj"]["k"], shapes["lm_head"]["n"]) == (1536, 49152)


def test_spec_sheet_per_precision():
    h100 = device_spec("NVIDIA H100 80GB HBM3")
    assert h100 == {"bf16": 989.0, "fp16": 989.0, "tf32": 494.5, "fp32": 67.0, "fp8": 1978.0, "memory_tb_s": 3.35}
    a100 = device_spec("NVIDIA A100-SXM4-80GB")
    assert (a100["tf32"], a100["fp8"], a100["memory_tb_s"]) == (156.0, None, 2.039)
    assert device_spec("NVIDIA H100 PCIe")["bf16"] == 756.0 and device_spec("Some CPU") is None


# ----------------------------------------------------------------------------- formulas and judges


def test_bus_bandwidth_follows_nccl_tests_on_fixed_timings():
    size, seconds = 2**30, 0.01
    algbw, busbw = collectives.bus_bandwidth("all_reduce", size, seconds, 8)
    assert algbw == pytest.approx(107.3741824e9) and busbw == pytest.approx(107.3741824e9 * 14 / 8)
    assert collectives.bus_bandwidth("all_gather", size, seconds, 8)[1] == pytest.approx(107.3741824e9 * 7 / 8)
    assert collectives.bus_bandwidth("reduce_scatter", size, seconds, 4)[1] == pytest.approx(107.3741824e9 * 3 / 4)
    # nccl-tests sendrecv_perf, 8 A100: 134217728 B in 1211.2 us -> algbw = busbw = 110.81 GB/s.
    assert collectives.bus_bandwidth("send_recv", 134217728, 1211.2e-6, 2)[1] / 1e9 == pytest.approx(110.81, abs=0.005)
    # The sweep takes the slowest rank's time: a collective ends when its last rank does.
    rows = [{"group": "within a node", "members": [0, 1], "op": "all_reduce", "size_bytes": size, "time_s": t}
            for t in (0.01, 0.02)]
    [cell] = collectives.summarize([{"sweep": [rows[0]]}, {"sweep": [rows[1]]}])
    assert cell["busbw_gb_s"] == pytest.approx(2**30 / 0.02 * 1.0 / 1e9)  # 2 ranks: 2(n-1)/n = 1
    assert collectives.sweep_sizes(16 * 2**20, 3) == sorted(collectives.sweep_sizes(16 * 2**20, 3))
    assert all(s % (4 * 3) == 0 for s in collectives.sweep_sizes(16 * 2**20, 3))


def test_a_rank_slower_than_its_peers_is_flagged():
    hosts = ["n0", "n0", "n1", "n1"]
    check = health.slow_ranks([700.0, 712.0, 698.0, 420.0], hosts, "sustained matmul", "TFLOP/s")
    assert check.status == FAIL and check.values["slow"] == [check.values["slow"][0]]
    assert "rank 3 (n1)" in check.figure and "40% below" in check.figure
    assert health.slow_ranks([700.0, 660.0, 720.0], hosts[:3], "x", "TFLOP/s").status == OK


def test_slowdown_under_load_and_nvml_throttle_reasons_are_judged():
    steady = {"precision": "bf16", "seconds": 60, "tflops": [700.0] * 10, "nvml": []}
    assert health.judge(steady, cuda=False)[0].status == OK
    cooling = dict(steady, tflops=[700.0] * 4 + [650.0] * 3 + [560.0] * 3)  # last third at 80%
    assert health.judge(cooling, cuda=True)[0].status == WARN
    sample = {"temperature_c": 88, "sm_clock_mhz": 1400, "max_sm_clock_mhz": 1980, "power_w": 690.0,
              "power_limit_w": 700.0, "throttle_reasons": 0x4 | 0x40}
    clocks = health.judge(dict(steady, nvml=[sample]), cuda=True)[1]
    assert clocks.status == FAIL and "hardware thermal slowdown" in clocks.figure


MOUNTS = r"""sysfs /sys sysfs rw,nosuid 0 0
/dev/nvme0n1p1 / ext4 rw,relatime 0 0
overlay /work overlay rw,lowerdir=/a,upperdir=/b 0 0
fs1:/export/data /mnt/data nfs4 rw,vers=4.2 0 0
10.0.0.1@tcp:/scratch /lustre lustre rw 0 0
gcsfuse /gcs fuse.gcsfuse rw 0 0
/dev/md0 /mnt/local\040nvme xfs rw 0 0
weka0 /weka wekafs rw 0 0
"""


def test_network_file_systems_are_recognised_from_a_mounts_table(tmp_path):
    mounts = storage.parse_mounts(MOUNTS)
    fs = lambda path: storage.filesystem_of(path, mounts)[1]
    assert [fs(p) for p in ("/mnt/data/shards", "/mnt/database", "/lustre/x/y", "/gcs/b", "/mnt/local nvme/s",
                            "/weka", "/work/wt")] == ["nfs4", "ext4", "lustre", "fuse.gcsfuse", "xfs", "wekafs", "overlay"]
    assert [storage.is_network(t) for t in ("nfs4", "lustre", "fuse.gcsfuse", "wekafs", "ext4", "xfs", "overlay")] == \
        [True, True, True, True, False, False, False]
    # End to end: a real shard folder that the mounts table places on NFS is a WARN naming the fix.
    write_random_documents(tmp_path / "shards", "a", 1, 256)
    files = [tmp_path / "shards" / "a_00000.bin"]
    table = MOUNTS + f"fs1:/export {tmp_path} nfs rw 0 0\n"
    measured = storage.measure({str(tmp_path / "shards"): (files, 2)}, tmp_path, TINY, 32, mounts_text=table)
    rows = storage.judge(measured, tokens_per_s_needed=None, checkpoint_bytes=None, keep_checkpoints=2)
    [where] = [c for c in rows if c.name.endswith("file system") and c.name.startswith("data")]
    assert where.status == WARN and "local NVMe" in where.advice and where.figure.startswith("nfs at ")
    assert not list(tmp_path.glob(".smoltrain-doctor-*"))  # the write probe cleaned up


# ----------------------------------------------------------------------------- CLI


def test_strict_exits_1_on_a_fail_and_0_otherwise(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "budget_for", lambda device, quick: TINY)
    shards = str(load_config(str(recipe)).data.sources["a"])
    out = tmp_path / "d.json"
    assert main(["doctor", "--strict", "--data", shards, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["verdict"] != FAIL
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(2 * cores)  # oversubscribed: the FAIL the project's test machines met
    assert main(["doctor", "--data", shards]) == 0  # a FAIL without --strict still exits 0
    assert main(["doctor", "--strict", "--data", shards]) == 1
    assert "oversubscribed" in capsys.readouterr().out
    assert doctor.exit_code({"verdict": WARN}, strict=True) == 0


@pytest.mark.parametrize("case", ["missing data", "not a dataset", "missing checkpoints", "json folder", "bad recipe key",
                                  "set without recipe"])
def test_bad_arguments_are_one_line_errors(case, recipe, tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    args = {
        "missing data": ["--data", str(tmp_path / "nope")],
        "not a dataset": ["--data", str(tmp_path / "plain")],
        "missing checkpoints": ["--checkpoints", str(tmp_path / "nope")],
        "json folder": ["--json", str(tmp_path / "nope" / "d.json")],
        "bad recipe key": ["--recipe", str(recipe), "--set", "train.micro_batch=2"],
        "set without recipe": ["--set", "train.micro_batch_size=2"],
    }[case]
    start = time.perf_counter()
    assert main(["doctor", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("smoltrain doctor: error:") and len(err.splitlines()) == 1
    assert time.perf_counter() - start < 5  # refused before measuring anything


# ----------------------------------------------------------------------------- two gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@leaves_without_teardown
def _rank(rank: int, world: int, port: int, recipe: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # two ranks share 2 cores
    if rank == 1:  # a throttled device: every matmul of its sustained load takes longer
        fast = health.matmul_fn

        def slow_matmul(*args):
            fn = fast(*args)
            return lambda: (fn(), time.sleep(SLOW_SLEEP_S))

        health.matmul_fn = slow_matmul
    result = doctor.run(recipe, budget=TINY, console=quiet())
    code = doctor.exit_code(result, strict=True)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"code": code, "result": result if rank == 0 else None}))


@pytest.mark.slow
def test_every_section_runs_under_two_gloo_ranks_and_the_slow_rank_is_flagged(recipe, tmp_path):
    mp.spawn(_rank, args=(2, _free_port(), str(recipe), str(tmp_path)), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())["result"]
    assert result["world_size"] == 2 and {c["section"] for c in result["checks"]} == set(SECTIONS)
    checks = {c["name"]: c for c in result["checks"]}
    slow = checks["slow ranks (sustained matmul)"]
    assert slow["status"] == FAIL and [s.split(" (")[0] for s in slow["values"]["slow"]] == ["rank 1"]
    # Both ranks return the same verdict, so --strict exits 1 on every rank.
    assert result["verdict"] == FAIL
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["code"] for r in (0, 1)] == [1, 1]
    # The sweep: every op at every size, 2 ranks within one node, nccl-tests' busbw from the slowest time.
    sweep = result["collective_sweep"]
    sizes = collectives.sweep_sizes(int(TINY.collective_max_mb * 2**20), 2)
    assert sorted((r["op"], r["size_bytes"]) for r in sweep) == sorted((op, s) for op in collectives.OPS for s in sizes)
    for row in sweep:
        slowest = max(m["collectives"]["sweep"][i]["time_s"] for m in result["measurements"]
                      for i, r in enumerate(m["collectives"]["sweep"]) if (r["op"], r["size_bytes"]) == (row["op"], row["size_bytes"]))
        assert row["time_s"] == slowest and row["group"] == "within a node"
        assert row["busbw_gb_s"] == pytest.approx(collectives.bus_bandwidth(row["op"], row["size_bytes"], slowest, 2)[1] / 1e9)
    assert checks["slow ranks (send/recv ring)"]["values"]["per_rank"] and len(result["hosts"]) == 2
    # The loader check adds both ranks' loaders of the node; compute rows merge both ranks.
    loader = checks["loader tokens/s per node"]["values"]
    assert loader["per_node"] == [pytest.approx(sum(r["tokens_per_s"] for r in loader["per_rank"]))]
    assert set(checks["fp32 matmul 32x32x32"]["values"]["per_rank"]) == {"0", "1"}


def test_gpu_figures_are_judged_against_the_spec_sheet_and_the_playbook():
    """The CUDA judges on recorded-style figures (no GPU needed): shares of spec, fp8 vs bf16 at the
    recipe's shapes, PCIe, and all-reduce against the playbook's H100 nodes."""
    spec = device_spec("NVIDIA H100 80GB HBM3")
    measured = {"square_size": 8192, "square": {"bf16": {"tflops": 730.0}, "fp32": {"tflops": 30.0},
                                                "fp8": {"error": "fp8 tensor cores need compute capability 8.9"}},
                "recipe": [dict(name="down_proj", m=8192, k=11008, n=2048, count=36, rows_timed=8192,
                                seconds={"bf16": 1.0e-3, "fp8": 1.2e-3}, tflops={"bf16": 370.0, "fp8": 300.0})]}
    checks = {c.name: c for c in compute.judge(measured, spec, cuda=True, precision="bf16")}
    assert checks["bf16 matmul 8192x8192x8192"].status == OK  # 74% of 989
    assert checks["fp32 matmul 8192x8192x8192"].status == WARN  # 45% of 67
    assert checks["fp8 matmul 8192x8192x8192"].status == "INFO"
    faster = checks["faster precision for this model"]
    assert faster.values["faster"] == "bf16" and faster.values["speedup"] == pytest.approx(1.2)
    ridge = 989 / 3.35  # FLOP per byte
    intensity = compute.arithmetic_intensity(8192, 11008, 2048, 2)
    assert checks["down_proj 8192x11008x2048 (x36)"].values["ridge_flop_per_byte"] == pytest.approx(ridge)
    assert ("compute-bound" if intensity >= ridge else "memory-bound") in checks["down_proj 8192x11008x2048 (x36)"].reference

    from smoltrain.doctor import memory

    figures = {"device_copy_gb_s": 2900.0, "h2d_pinned_gb_s": 52.0, "d2h_pinned_gb_s": 30.0, "h2d_pageable_gb_s": 12.0,
               "d2h_pageable_gb_s": 8.0, "device_free_bytes": 79 * 2**30, "device_total_bytes": 80 * 2**30,
               "pcie": {"generation": 5, "max_generation": 5, "width": 8, "max_width": 16}}
    rows = {c.name: c for c in memory.judge(figures, spec, cuda=True)}
    assert rows["device copy (HBM)"].status == OK  # 87% of 3.35 TB/s
    assert rows["host to device, pinned"].status == OK and rows["device to host, pinned"].status == WARN  # 83% and 48% of 63 GB/s
    assert rows["PCIe link width"].status == WARN and rows["free device memory"].status == OK

    # 16 H100 ranks on 2 nodes: all-reduce busbw from the slowest rank's time, judged against ~335 / ~480 GB/s.
    hosts = ["n0"] * 8 + ["n1"] * 8
    size = 2**30

    def rank_record(slow: bool) -> dict:
        return {"sweep": [{"group": "across nodes", "members": list(range(16)), "op": op, "size_bytes": size,
                           "time_s": (0.03 if slow else 0.006)} for op in collectives.OPS] +
                         [{"group": "within a node", "members": list(range(8)), "op": op, "size_bytes": size,
                           "time_s": 0.004} for op in collectives.OPS],
                "ring": {"size_bytes": size, "time_s": 0.05 if slow else 0.02}}

    per_rank = [rank_record(slow=r == 11) for r in range(16)]
    checks, _ = collectives.judge(per_rank, hosts, "NVIDIA H100 80GB HBM3")
    rows = {c.name: c for c in checks}
    across = rows["all-reduce (across nodes, 16 ranks)"]
    assert across.values["value"] == pytest.approx(size / 0.03 * 2 * 15 / 16 / 1e9) and across.status == FAIL  # 67 GB/s
    assert rows["all-reduce (within a node, 8 ranks)"].status == OK  # 470 GB/s
    assert rows["slow ranks (send/recv ring)"].status == FAIL and "rank 11 (n1)" in rows["slow ranks (send/recv ring)"].figure


def test_more_threads_slower_than_one_is_a_warn_naming_the_fix():
    measured = {"square_size": 64, "square": {}, "recipe": [],
                "threads": {"shape": [512, 128, 128], "threads": 2, "tflops": 0.6e-3, "tflops_one_thread": 48.3e-3}}
    [check] = compute.judge(measured, None, cuda=False, precision="fp32")
    assert check.status == WARN and "80.5x faster" in check.advice and "OMP_NUM_THREADS=1" in check.advice
    measured["threads"]["tflops"] = 90e-3
    assert compute.judge(measured, None, cuda=False, precision="fp32")[0].status == OK
