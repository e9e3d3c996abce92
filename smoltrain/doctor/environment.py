"""Environment: versions, devices, CPU cores against threads per process, memory, /dev/shm, the
open-file limit and the NCCL / OMP variables that change performance.

Threads x processes per node above the cores this process may use is a FAIL on CPU (OpenMP
oversubscription made steps 200x slower on this project's 2-core test machines), a WARN on GPUs.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
from pathlib import Path

import psutil
import torch

from smoltrain.doctor.report import FAIL, INFO, OK, WARN, Check

ENV_PREFIXES = ("NCCL_", "TORCH_NCCL_", "OMP_", "MKL_", "CUDA_", "PYTORCH_CUDA_ALLOC_CONF", "TORCH_DISTRIBUTED_DEBUG",
                "GLOO_", "UCX_", "FI_")
# Variables that cost throughput when set as shown.
ENV_WARNINGS = {
    ("NCCL_P2P_DISABLE", "1"): "disables NVLink / PCIe peer-to-peer: intra-node collectives go through the host",
    ("NCCL_IB_DISABLE", "1"): "disables InfiniBand: inter-node collectives fall back to TCP sockets",
    ("NCCL_SHM_DISABLE", "1"): "disables shared-memory transport inside a node",
    ("CUDA_LAUNCH_BLOCKING", "1"): "serialises every kernel launch (a debugging switch)",
    ("NCCL_DEBUG", "INFO"): "NCCL_DEBUG=INFO logs every communicator setup (fine for a check, noisy in a run)",
}
SHM_MIN = 1 << 30  # containers default to 64 MiB; NCCL's shared-memory transport and loader workers need more
NOFILE_MIN = 4096


def _driver() -> str | None:
    path = Path("/proc/driver/nvidia/version")
    if path.is_file():
        first = path.read_text().splitlines()[0]
        for word in first.split():
            if word[:1].isdigit() and "." in word:
                return word
    return None


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(device: torch.device, local_world: int) -> dict:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    vm = psutil.virtual_memory()
    shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else None
    cuda = device.type == "cuda"
    return {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
        "driver": _driver() if cuda else None,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "device_count": torch.cuda.device_count() if cuda else 0,
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "cpu_cores": cores,
        "cpu_count": os.cpu_count(),
        "threads_per_process": torch.get_num_threads(),
        "processes_per_node": local_world,
        "memory_total_bytes": vm.total,
        "memory_available_bytes": vm.available,
        "shm_bytes": shm,
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
    }


def judge(m: dict) -> list[Check]:
    gib = 2**30
    versions = f"torch {m['torch']}, python {m['python']}"
    if m["cuda"]:
        versions += f", CUDA {m['cuda']}, NCCL {m['nccl']}, driver {m['driver'] or 'unknown'}"
    elif m["hip"]:
        versions += f", ROCm {m['hip']}"
    devices = (f"{m['device_count']} x {m['device_name']} (sm {'.'.join(map(str, m['capability']))})"
               if m["device_count"] else f"CPU: {m['device_name']}")
    checks = [Check("environment", "versions", versions), Check("environment", "devices", devices)]
    used = m["threads_per_process"] * m["processes_per_node"]
    if used > m["cpu_cores"]:
        # CPU training does its matmuls on these threads (FAIL); a GPU job mostly waits on the device,
        # but oversubscribed loader and launch threads still jitter every step (WARN).
        status = WARN if m["device"].startswith("cuda") else FAIL
        advice = (f"oversubscribed ({used} threads on {m['cpu_cores']} cores; 200x slower steps seen on this project): "
                  f"set OMP_NUM_THREADS={max(1, m['cpu_cores'] // m['processes_per_node'])}")
    else:
        status, advice = OK, ""
    checks.append(Check("environment", "threads per process",
                        f"{m['threads_per_process']} threads x {m['processes_per_node']} processes per node",
                        f"{m['cpu_cores']} usable cores ({m['cpu_count']} on the host)", status, advice,
                        {"value": used, "cores": m["cpu_cores"]}))
    load = m.get("load_average")
    if load is not None:
        # Measured before the doctor starts working: other processes' threads. On this project's shared
        # 2-core machine a load of ~7 made 2-thread GEMMs of the demo's shapes 70x slower than 1 thread.
        busy = load > m["cpu_cores"]
        checks.append(Check("environment", "system load", f"{load:.1f} runnable threads (1-minute average)",
                            f"<= {m['cpu_cores']} usable cores", WARN if busy else OK,
                            "other processes compete for these cores: figures below and training steps will be "
                            "slower (with several threads per process, much slower)" if busy else "",
                            {"value": load}))
    checks.append(Check("environment", "host memory", f"{m['memory_available_bytes'] / gib:,.1f} of "
                        f"{m['memory_total_bytes'] / gib:,.1f} GiB available", "", INFO, ""))
    if m["shm_bytes"] is None:
        checks.append(Check("environment", "/dev/shm", "absent", "", WARN, "no shared memory: NCCL and loader workers need it"))
    else:
        ok = m["shm_bytes"] >= SHM_MIN
        checks.append(Check("environment", "/dev/shm", f"{m['shm_bytes'] / gib:,.1f} GiB", ">= 1 GiB",
                            OK if ok else WARN, "" if ok else "too small (a container default?): docker run --shm-size=16g",
                            {"value": m["shm_bytes"] / gib}))
    ok = m["open_files_limit"] >= NOFILE_MIN
    checks.append(Check("environment", "open-file limit", f"{m['open_files_limit']:,}", f">= {NOFILE_MIN:,}",
                        OK if ok else WARN, "" if ok else "ulimit -n 65536 (thousands of shards, sockets and NCCL)",
                        {"value": m["open_files_limit"]}))
    warnings = [f"{k}={v}: {why}" for (k, value), why in ENV_WARNINGS.items() for v in [m["env"].get(k)] if v == value]
    listing = ", ".join(f"{k}={v}" for k, v in m["env"].items()) or "none set"
    checks.append(Check("environment", "NCCL / OMP variables", listing, "", WARN if warnings else INFO,
                        "; ".join(warnings), {"env": m["env"]}))
    return checks
