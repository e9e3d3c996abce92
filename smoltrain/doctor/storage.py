"""Storage: for each data folder and the checkpoint folder, the file system (local or network), free
space against the planned checkpoints, sequential and random-window reads with the page cache
dropped, and checkpoint writes with fsync.

The page cache is dropped per file with posix_fadvise(POSIX_FADV_DONTNEED), which needs no root:
clean pages of a file nobody maps leave the cache, so the next read comes from the disk (or the
network). SmolLM3's throughput fell when network storage evicted data shards mid-run; data belongs
on local NVMe.
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

from smoltrain.doctor.report import FAIL, INFO, OK, WARN, Check
from smoltrain.doctor.timing import Budget

# File-system types that put data behind a network (or a host share) rather than a local disk.
NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "wekafs", "gpfs", "beegfs", "ceph", "cephfs",
    "glusterfs", "afs", "panfs", "orangefs", "9p", "virtiofs", "davfs", "fuse", "fuseblk",
}
LOCAL_FUSE = {"fuse.overlayfs", "fuse.lxcfs"}  # FUSE types that sit on a local disk
BLOCK = 4 * 2**20  # sequential reads in 4 MiB requests
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
PLAYBOOK_READ = "playbook: local NVMe RAID ~26.6 GB/s, shared file systems down to ~1.1 GB/s"
_HAS_FADVISE = hasattr(os, "posix_fadvise")


def parse_mounts(text: str) -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) per line of /proc/self/mounts (octal escapes decoded)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            point = fields[1].encode().decode("unicode_escape")  # "\040" is a space in a mount point
            mounts.append((point, fields[2], fields[0]))
    return mounts


def filesystem_of(path: str | os.PathLike, mounts: list[tuple[str, str, str]]) -> tuple[str, str, str]:
    """The mount holding `path`: the longest mount point that is a prefix of its real path (the last
    one listed wins for a point mounted twice)."""
    real = os.path.realpath(path)
    best = ("/", "unknown", "")
    for point, fstype, source in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[0]):
            best = (point, fstype, source)
    return best


def is_network(fstype: str) -> bool:
    if fstype in LOCAL_FUSE:
        return False
    return fstype in NETWORK_FS or fstype.startswith("fuse.")


def drop_cache(files: list[Path]) -> str:
    """Drop the files' pages from the page cache; returns how ("fadvise") or "not dropped"."""
    if not _HAS_FADVISE:
        return "not dropped"
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def read_plan(files: list[Path], max_bytes: int) -> list[tuple[Path, int]]:
    """(file, bytes) to read in order, up to max_bytes in all."""
    plan, left = [], max_bytes
    for path in files:
        if left <= 0:
            break
        take = min(path.stat().st_size, left)
        if take:
            plan.append((path, take))
            left -= take
    return plan


def sequential_read(plan: list[tuple[Path, int]]) -> tuple[int, float]:
    """(bytes, seconds) reading each file's first bytes in BLOCK requests into one buffer."""
    buffer = bytearray(BLOCK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path, size in plan:
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < size:
                got = os.readv(fd, [view[:min(BLOCK, size - done)]])
                if got == 0:
                    break
                done += got
            total += done
        finally:
            os.close(fd)
    return total, time.perf_counter() - start


def random_windows(files: list[Path], window_bytes: int, seconds: float, seed: int = 0) -> tuple[int, float]:
    """(windows, seconds spent in pread) reading random windows one at a time: the loader's access
    pattern without its read-ahead, i.e. what a cold window costs. Kernel read-ahead is turned off
    (POSIX_FADV_RANDOM) and each window's pages are dropped after it is read, so a small dataset does
    not warm up into the page cache during the measurement."""
    sizes = [p.stat().st_size for p in files]
    rng = random.Random(seed)
    fds = [os.open(p, os.O_RDONLY) for p in files]
    try:
        if _HAS_FADVISE:
            for fd in fds:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        count, reading, start = 0, 0.0, time.perf_counter()
        while count < 3 or time.perf_counter() - start < seconds:
            i = rng.choices(range(len(files)), weights=sizes)[0]
            offset = rng.randrange(0, max(1, sizes[i] - window_bytes)) // 8 * 8
            t = time.perf_counter()
            os.pread(fds[i], window_bytes, offset)
            reading += time.perf_counter() - t
            if _HAS_FADVISE:
                first = offset // PAGE * PAGE  # the kernel drops whole pages inside the range only
                os.posix_fadvise(fds[i], first, offset + window_bytes - first + PAGE - 1, os.POSIX_FADV_DONTNEED)
            count += 1
        return count, reading
    finally:
        for fd in fds:
            os.close(fd)


def write_rate(folder: Path, size: int) -> float:
    """Bytes/s writing `size` bytes to a temporary file in `folder` and fsync-ing it (then removed)."""
    path = folder / f".smoltrain-doctor-{os.getpid()}.tmp"
    block = os.urandom(min(size, BLOCK))
    try:
        start = time.perf_counter()
        with open(path, "wb", buffering=0) as f:
            written = 0
            while written < size:
                written += f.write(block[:min(len(block), size - written)])
            os.fsync(f.fileno())
        return size / (time.perf_counter() - start)
    finally:
        path.unlink(missing_ok=True)


def measure(data_dirs: dict[str, tuple[list[Path], int]], checkpoint_dir: Path | None, budget: Budget, seq_len: int,
            mounts_text: str | None = None) -> dict:
    """Every data folder (folder -> its shard files and bytes per token) and the checkpoint folder,
    on this node; random windows are seq_len + 1 tokens, as the loader reads them."""
    if mounts_text is None:
        mounts_text = Path("/proc/self/mounts").read_text() if Path("/proc/self/mounts").is_file() else ""
    mounts = parse_mounts(mounts_text)
    out = {"data": {}, "checkpoints": None}
    for folder, (files, token_bytes) in data_dirs.items():
        window_bytes = (seq_len + 1) * token_bytes
        point, fstype, source = filesystem_of(folder, mounts)
        plan = read_plan(files, budget.storage_mb * 2**20)
        cache = drop_cache([p for p, _ in plan])
        nbytes, seconds = sequential_read(plan)
        drop_cache(files)
        windows, window_s = random_windows(files, window_bytes, budget.storage_s)
        out["data"][folder] = {"mount": point, "fstype": fstype, "source": source, "network": is_network(fstype),
                               "cache": cache, "files": [str(p) for p, _ in plan], "read_bytes": nbytes,
                               "read_s": seconds, "read_gb_s": nbytes / seconds / 1e9,
                               "token_bytes": token_bytes, "window_bytes": window_bytes, "windows": windows,
                               "windows_per_s": windows / window_s}
    if checkpoint_dir is not None:
        point, fstype, source = filesystem_of(checkpoint_dir, mounts)
        out["checkpoints"] = {"folder": str(checkpoint_dir), "mount": point, "fstype": fstype, "source": source,
                              "network": is_network(fstype), "free_bytes": shutil.disk_usage(checkpoint_dir).free,
                              "write_gb_s": write_rate(checkpoint_dir, budget.write_mb * 2**20) / 1e9}
    return out


def _size(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _short(folder: str) -> str:
    """A data folder's row label: its last two path parts (the full path is in the file-system row)."""
    parts = Path(folder).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else folder


def _against_need(rate: float, need: float | None) -> tuple[str, str]:
    """Status and advice of a read rate (tokens/s) against what the node's loader needs."""
    if need is None:
        return INFO, ""
    if rate < need:
        return FAIL, "cold reads cannot feed the plan: move the shards to local NVMe"
    if rate < 4 * need:
        return WARN, "little headroom once the page cache is cold: prefer local NVMe"
    return OK, ""


def judge(measured: dict, tokens_per_s_needed: float | None, checkpoint_bytes: float | None,
          keep_checkpoints: int) -> list[Check]:
    """`tokens_per_s_needed`: the node's loader need from the plan (None without a recipe)."""
    checks = []
    need_text = f"; the plan needs {tokens_per_s_needed:,.0f} tokens/s per node" if tokens_per_s_needed else ""
    for folder, m in measured["data"].items():
        where = f"{m['fstype']} at {m['mount']}" + (f" ({m['source']})" if m["source"] else "") + f": {folder}"
        folder = _short(folder)
        if m["network"]:
            checks.append(Check("storage", f"data {folder}: file system", where, "local disk", WARN,
                                "network storage evicted SmolLM3's data shards and throttled the run: copy them "
                                "to local NVMe", {"fstype": m["fstype"]}))
        else:
            checks.append(Check("storage", f"data {folder}: file system", where, "local disk", OK, "",
                                {"fstype": m["fstype"]}))
        token_bytes = m["token_bytes"]
        tokens_per_s = m["read_gb_s"] * 1e9 / token_bytes
        status, advice = _against_need(tokens_per_s, tokens_per_s_needed)
        cache = "page cache dropped" if m["cache"] == "fadvise" else "page cache NOT dropped (figure is optimistic)"
        checks.append(Check("storage", f"data {folder}: sequential read",
                            f"{m['read_gb_s']:.2f} GB/s over {m['read_bytes'] / 2**20:,.0f} MiB ({cache})",
                            PLAYBOOK_READ + need_text, status, advice, {"value": m["read_gb_s"], **m}))
        window_tokens = m["window_bytes"] // token_bytes - 1
        tokens_per_s = m["windows_per_s"] * window_tokens
        status, advice = _against_need(tokens_per_s, tokens_per_s_needed)
        checks.append(Check("storage", f"data {folder}: random windows",
                            f"{m['windows_per_s']:,.0f} windows/s of {window_tokens} tokens = {tokens_per_s:,.0f} tokens/s "
                            "(one at a time, each cold)", "the loader's access pattern" + need_text, status, advice,
                            {"value": m["windows_per_s"], "tokens_per_s": tokens_per_s}))
    c = measured["checkpoints"]
    if c is None:
        return checks
    gib = 2**30
    checks.append(Check("storage", "checkpoints: file system", f"{c['fstype']} at {c['mount']}", "", INFO,
                        "shared storage is fine for checkpoints (every node must see them)" if c["network"] else "",
                        {"fstype": c["fstype"]}))
    if checkpoint_bytes:
        need = (keep_checkpoints + 1) * checkpoint_bytes  # the newest is complete before the oldest goes
        status = FAIL if c["free_bytes"] < need else WARN if c["free_bytes"] < 2 * need else OK
        advice = "" if status == OK else "free space or lower train.keep_checkpoints before the run fills the disk"
        checks.append(Check("storage", "checkpoints: free space",
                            f"{c['free_bytes'] / gib:,.1f} GiB free", f"{keep_checkpoints} + 1 checkpoints of "
                            f"{_size(checkpoint_bytes)} = {_size(need)}", status, advice,
                            {"value": c["free_bytes"] / gib, "needed_gib": need / gib}))
        save_s = checkpoint_bytes / (c["write_gb_s"] * 1e9)
        status = OK if save_s < 120 else WARN
        checks.append(Check("storage", "checkpoints: write with fsync",
                            f"{c['write_gb_s']:.2f} GB/s: {save_s:,.3g} s per checkpoint from one writer",
                            "a save under 2 minutes", status,
                            "" if status == OK else "saves stall training: write checkpoints to local NVMe and copy them off",
                            {"value": c["write_gb_s"], "save_s": save_s}))
    else:
        checks.append(Check("storage", "checkpoints: free space", f"{c['free_bytes'] / gib:,.1f} GiB free",
                            "give --recipe to compare with its checkpoints", INFO, "", {"value": c["free_bytes"] / gib}))
        checks.append(Check("storage", "checkpoints: write with fsync", f"{c['write_gb_s']:.2f} GB/s", "", INFO, "",
                            {"value": c["write_gb_s"]}))
    return checks
