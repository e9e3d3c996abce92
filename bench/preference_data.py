"""Preference data preparation over worker processes against one process: pairs/s, wall and CPU
seconds, on the same synthetic conversational pairs, alternating in one window (a shared box's load moves).

Writes N ultrafeedback-shaped conversational pairs (a user prompt, a chosen and a rejected assistant
answer, text from bench/sft_data.py's sentence pool) into --files jsonl.gz files once, then prepares
them with `prepare_pairs(workers=1)` and with all cores into fresh caches, and checks that the two
folders hold the same pairs.

    python bench/preference_data.py --pairs 4000 --tokenizer /path/smollm2
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sft_data import WORDS, cpu_seconds  # noqa: E402  (bench/ is this script's folder)


def write_pairs(folder: Path, count: int, files: int) -> list[Path]:
    done = folder / "done.json"
    paths = [folder / f"prefs{i:02d}.jsonl.gz" for i in range(files)]
    if done.is_file() and json.loads(done.read_text()) == {"count": count, "files": files}:
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(" ".join(r.choice(WORDS) for _ in range(r.randint(6, 18))).capitalize() + "."
                        for _ in range(r.randint(lo, hi)))

    for i, path in enumerate(paths):
        with gzip.open(path, "wt", compresslevel=1) as f:
            for _ in range(count // files + (i < count % files)):
                row = {"prompt": [{"role": "user", "content": text(1, 4)}],
                       "chosen": [{"role": "assistant", "content": text(2, 8)}],
                       "rejected": [{"role": "assistant", "content": text(1, 6)}]}
                f.write(json.dumps(row) + "\n")
    done.write_text(json.dumps({"count": count, "files": files}))
    return paths


def timed_prepare(files: list[Path], tokenizer_dir: Path, cache: Path, workers: int | None) -> tuple[Path, float, float]:
    from smoltrain.post.preference.prepare import prepare_pairs

    start, cpu = time.perf_counter(), cpu_seconds()
    folder = prepare_pairs(files, tokenizer_dir, "chatml", 1024, False, cache, workers=workers)
    return folder, time.perf_counter() - start, cpu_seconds() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=4000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or folder (chatml is written beside a copy)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir", default=".cache/bench-preference-data")
    args = p.parse_args()

    from smoltrain.post.chat.template import write_chat_tokenizer
    from smoltrain.post.preference.prepare import PairShards

    root = Path(args.workdir).resolve()
    tokenizer_dir = write_chat_tokenizer(args.tokenizer, root / "tokenizer", "chatml")
    files = write_pairs(root / f"data-{args.pairs}", args.pairs, args.files)
    print(f"# bench/preference_data.py  {datetime.date.today()}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cores  python {platform.python_version()}")
    best: dict[str, tuple[float, float]] = {}
    folders = {}
    for _ in range(args.repeats):
        for name, workers in (("one process", 1), ("all cores", None)):
            folder, wall, cpu = timed_prepare(files, tokenizer_dir, root / f"cache-{time.time_ns()}", workers)
            folders[name] = folder
            best[name] = (min(best.get(name, (wall, cpu))[0], wall), min(best.get(name, (wall, cpu))[1], cpu))
    one, many = (PairShards(folders[name]) for name in ("one process", "all cores"))
    assert len(one) == len(many) == args.pairs and all(one[i] == many[i] for i in range(0, len(one), 97))
    print(f"{args.pairs:,} pairs in {args.files} files, best of {args.repeats} each, load average {os.getloadavg()[0]:.1f}:")
    print("| preparation | wall s | pairs/s | CPU s |")
    print("|---|---|---|---|")
    for name, (wall, cpu) in best.items():
        print(f"| {name} | {wall:.1f} | {args.pairs / wall:.0f} | {cpu:.1f} |")
    print(f"all cores / one process: {best['one process'][0] / best['all cores'][0]:.2f}x wall")


if __name__ == "__main__":
    main()
