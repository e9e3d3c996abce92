"""What the doctor says: a check (figure, reference, OK / WARN / FAIL, one sentence of advice), the
verdict, one rich table per section and the JSON file.

Checks measured on every rank are judged per rank and shown once: the worst rank's row, with the
median and the slowest rank beside it, so 64 GPUs make one row and a bad one still shows.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

INFO, OK, WARN, FAIL = "INFO", "OK", "WARN", "FAIL"
SEVERITY = {INFO: 0, OK: 1, WARN: 2, FAIL: 3}
STYLE = {INFO: "dim", OK: "green", WARN: "yellow", FAIL: "bold red"}
SECTIONS = ("environment", "compute", "memory", "health", "collectives", "storage", "loader")


@dataclass
class Check:
    section: str
    name: str
    figure: str  # what was measured, in words and units
    reference: str = ""  # what it is judged against
    status: str = INFO
    advice: str = ""  # one sentence; empty when there is nothing to do
    values: dict = field(default_factory=dict)  # every number behind the figure, for --json

    def to_dict(self) -> dict:
        return asdict(self)


def by_share(value: float, reference: float, ok: float, warn: float) -> str:
    """OK at or above `ok` x reference, WARN down to `warn` x reference, FAIL below."""
    share = value / reference
    return OK if share >= ok else WARN if share >= warn else FAIL


def worst(statuses) -> str:
    return max(statuses, key=SEVERITY.__getitem__, default=OK)


def merge_ranks(per_rank: list[list[Check]], labels: list[str]) -> list[Check]:
    """One check per name from every rank's list (labels: "rank 3 (host)" or a node's name): the worst
    rank's row (the lowest rank's when all agree), its figure followed by the spread over ranks;
    every rank's values in JSON."""
    if len(per_rank) == 1:
        return per_rank[0]
    names = list(dict.fromkeys(c.name for checks in per_rank for c in checks))
    merged = []
    for name in names:
        rows = {r: c for r, checks in enumerate(per_rank) for c in checks if c.name == name}
        bad = max(rows, key=lambda r: (SEVERITY[rows[r].status], -r))
        pick = rows[bad]
        figure = pick.figure
        numbers = {r: c.values.get("value") for r, c in rows.items()}
        if all(isinstance(x, (int, float)) for x in numbers.values()):
            lowest = min(numbers, key=numbers.__getitem__)
            figure += (f" [{labels[bad]}; median of {len(rows)}: {_fmt(statistics.median(numbers.values()))}, "
                       f"lowest {labels[lowest]}: {_fmt(numbers[lowest])}]")
        elif SEVERITY[pick.status] > SEVERITY[rows[min(rows)].status]:
            figure += f" [{labels[bad]}]"
        merged.append(Check(pick.section, name, figure, pick.reference, pick.status, pick.advice,
                            {"per_rank": {r: c.values for r, c in rows.items()}}))
    return merged


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def verdict(checks: list[Check]) -> dict:
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL, INFO)}
    return {"verdict": FAIL if counts[FAIL] else WARN if counts[WARN] else OK, "counts": counts}


def tables(result: dict) -> list:
    """One rich Table per section (plus the collectives sweep), in SECTIONS order."""
    from rich.table import Table

    out = []
    for section in SECTIONS:
        rows = [c for c in result["checks"] if c["section"] == section]
        if not rows:
            continue
        table = Table(title=section, title_justify="left", show_lines=False, expand=False)
        table.add_column("check", style="bold", no_wrap=True)
        table.add_column("figure")
        table.add_column("reference", style="dim")
        table.add_column("status", no_wrap=True)
        table.add_column("advice")
        for c in rows:
            table.add_row(c["name"], c["figure"], c["reference"], f"[{STYLE[c['status']]}]{c['status']}[/]", c["advice"])
        out.append(table)
        if section == "collectives" and result.get("collective_sweep"):
            out.append(sweep_table(result["collective_sweep"]))
    return out


def sweep_table(sweep: list[dict]):
    from rich.table import Table

    table = Table(title="collectives sweep (time: slowest rank; nccl-tests bus bandwidth)", title_justify="left")
    for name in ("group", "op", "size", "time", "algbw GB/s", "busbw GB/s"):
        table.add_column(name, justify="right" if name not in ("group", "op") else "left")
    for row in sweep:
        table.add_row(row["group"], row["op"], _bytes(row["size_bytes"]), f"{row['time_s'] * 1e6:,.0f} us",
                      f"{row['algbw_gb_s']:.3g}", f"{row['busbw_gb_s']:.3g}")
    return table


def _bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} B"


def print_report(result: dict, console) -> None:
    for table in tables(result):
        console.print(table)
    v, counts = result["verdict"], result["counts"]
    console.print(f"[{STYLE[v]}]verdict: {v}[/] ({counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL, "
                  f"{counts[INFO]} for information; {result['world_size']} rank(s) on {len(set(result['hosts']))} "
                  f"node(s), {result['elapsed_s']:.0f} s)")
