"""Memory: device copy bandwidth (HBM) against spec, host<->device over PCIe with pinned and pageable
host buffers, free device memory; on CPU, memcpy bandwidth and available RAM.

Copy bandwidth counts bytes read plus bytes written (2 x size / time), the convention of STREAM's
copy and of HBM spec sheets; a transfer between host and device counts its size once.
"""

from __future__ import annotations

import psutil
import torch

from smoltrain.doctor.report import INFO, OK, WARN, Check, by_share
from smoltrain.doctor.timing import Budget, time_op

# PCIe payload bandwidth per lane and direction, GB/s (128b/130b encoding from Gen3; Gen6 PAM4 FLIT).
PCIE_LANE_GB_S = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}
PLAYBOOK_PCIE_GB_S = 14.0  # their PCIe Gen4 x8 CPU<->GPU links
OK_SHARE, WARN_SHARE = 0.6, 0.4  # an H100 copies at ~85% of its 3.35 TB/s; a pinned PCIe transfer at ~80%


def _pcie_link(device: torch.device) -> dict | None:
    from smoltrain.doctor.health import nvml_handle

    handle = nvml_handle(device)
    if handle is None:
        return None
    import pynvml

    try:
        return {"generation": pynvml.nvmlDeviceGetCurrPcieLinkGeneration(handle),
                "max_generation": pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
                "width": pynvml.nvmlDeviceGetCurrPcieLinkWidth(handle),
                "max_width": pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle)}
    except pynvml.NVMLError:
        return None


def _device_copies(device: torch.device, size: int, seconds: float) -> dict:
    """GB/s of a device-to-device copy (read + write) and of each host<->device transfer."""
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    pinned = torch.ones(size, dtype=torch.uint8, pin_memory=True)
    pageable = torch.ones(size, dtype=torch.uint8)
    out = {"device_copy_gb_s": 2 * size / time_op(lambda: dst.copy_(src), seconds, device) / 1e9}
    transfers = {
        "h2d_pinned": lambda: dst.copy_(pinned, non_blocking=True),
        "h2d_pageable": lambda: dst.copy_(pageable),
        "d2h_pinned": lambda: pinned.copy_(src, non_blocking=True),
        "d2h_pageable": lambda: pageable.copy_(src),
    }
    for name, fn in transfers.items():
        out[f"{name}_gb_s"] = size / time_op(fn, seconds / 2, device) / 1e9
    return out


def measure(device: torch.device, budget: Budget) -> dict:
    size = budget.copy_mb * 2**20
    vm = psutil.virtual_memory()
    out = {"bytes": size, "host_total_bytes": vm.total, "host_available_bytes": vm.available}
    if device.type != "cuda":
        src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
        out["host_copy_gb_s"] = 2 * size / time_op(lambda: dst.copy_(src), budget.measure_s, device) / 1e9
        return out
    out.update(_device_copies(device, size, budget.measure_s))
    torch.cuda.empty_cache()
    out["device_free_bytes"], out["device_total_bytes"] = torch.cuda.mem_get_info(device)
    out["pcie"] = _pcie_link(device)
    return out


def judge(measured: dict, spec: dict | None, cuda: bool) -> list[Check]:
    gib = 2**30
    if not cuda:
        return [
            Check("memory", "host memcpy", f"{measured['host_copy_gb_s']:.1f} GB/s (read + write)",
                  "no spec for CPUs", INFO, "", {"value": measured["host_copy_gb_s"]}),
            Check("memory", "host memory", f"{measured['host_available_bytes'] / gib:.1f} of "
                  f"{measured['host_total_bytes'] / gib:.1f} GiB available", "", INFO, "",
                  {"value": measured["host_available_bytes"] / gib}),
        ]
    checks = []
    copy = measured["device_copy_gb_s"]
    if spec:
        peak = spec["memory_tb_s"] * 1000
        status = by_share(copy, peak, OK_SHARE, WARN_SHARE)
        checks.append(Check("memory", "device copy (HBM)", f"{copy:,.0f} GB/s ({100 * copy / peak:.0f}% of spec)",
                            f"spec {peak:,.0f} GB/s (playbook H100: ~3 TB/s)", status,
                            "" if status == OK else "memory clocks low or a faulty part: compare with the node's other GPUs",
                            {"value": copy}))
    else:
        checks.append(Check("memory", "device copy (HBM)", f"{copy:,.0f} GB/s", "no spec for this device", INFO, "",
                            {"value": copy}))
    link = measured.get("pcie")
    if link:
        per_direction = PCIE_LANE_GB_S.get(link["max_generation"], 0) * link["max_width"]
        reference = f"PCIe Gen{link['max_generation']} x{link['max_width']}: {per_direction:.0f} GB/s per direction"
    else:
        per_direction = None
        reference = f"playbook: ~{PLAYBOOK_PCIE_GB_S:g} GB/s (PCIe Gen4 x8)"
    for name in ("h2d_pinned", "d2h_pinned", "h2d_pageable", "d2h_pageable"):
        rate = measured[f"{name}_gb_s"]
        label = name.replace("h2d", "host to device").replace("d2h", "device to host").replace("_", ", ")
        if name.endswith("pageable"):
            status, advice = INFO, ("pageable copies stage through a pinned buffer; the loader pins its batches"
                                    if rate < 0.5 * measured[name.replace("pageable", "pinned") + "_gb_s"] else "")
        elif per_direction:
            status = by_share(rate, per_direction, OK_SHARE, WARN_SHARE)
            advice = "" if status == OK else "slow link: check the slot, lane width and the GPU's NUMA affinity"
        else:
            status = OK if rate >= 0.7 * PLAYBOOK_PCIE_GB_S else WARN
            advice = "" if status == OK else "below the playbook's PCIe Gen4 x8: check the slot and NUMA affinity"
        checks.append(Check("memory", label, f"{rate:.1f} GB/s", reference, status, advice, {"value": rate}))
    if link and link["width"] < link["max_width"]:
        checks.append(Check("memory", "PCIe link width", f"x{link['width']} of x{link['max_width']}", "full width",
                            WARN, "the link trained at reduced width: reseat the GPU or check the riser", link))
    free, total = measured["device_free_bytes"], measured["device_total_bytes"]
    status = OK if free >= 0.9 * total else WARN
    checks.append(Check("memory", "free device memory", f"{free / gib:.1f} of {total / gib:.1f} GiB", "", status,
                        "" if status == OK else f"another process holds {(total - free) / gib:.1f} GiB of this device",
                        {"value": free / gib}))
    return checks
