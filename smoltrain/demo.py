"""`smoltrain demo`: the whole playbook in miniature on the embedded corpus, ending in one report.

data -> baselines and budget -> ablation (document masking on/off, 2 seeds) -> pretrain -> evaluate ->
export to Hugging Face and load back with transformers -> vibe test -> report (md + PNG + HTML).
Budgets adapt to the machine: a probe measures training throughput, the ablation gets a share of
`--minutes`, and pretraining gets what is left at the throughput the ablation actually achieved,
so the demo fits its time on a 2-core laptop and simply trains longer on a faster machine. On a
machine slowed down by other work, pretraining still gets 40% of the budget and the demo ends late.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from smoltrain.config import Config, DataConfig, config_from_dict, load_config
from smoltrain.errors import ConfigError
from smoltrain.train.distributed import resolve_device

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
MARKER = "demo.json"  # marks a folder as the demo's own output, which a re-run may replace
SUITE_ITEMS = 200  # items per embedded task (the suite default): +-3.5 points of standard error at 50%
ABLATION_SHARE = 0.3  # of the time left for training after the fixed stages
EVAL_RESERVE_S = 60.0  # final evaluation (4 tasks x 200 items + validation): ~20 s on 2 idle cores
FIXED_RESERVE_S = 30.0  # export, transformers load, vibe test, report
# Pretraining gets at least this share of --minutes even when a slowed-down machine made the
# ablation overrun: the demo then runs late instead of reporting a model trained for 3 seconds.
PRETRAIN_FLOOR_SHARE = 0.4
VAL_BATCHES = 8  # per source, during training and at the end (the same windows, so one comparable curve)
VIBE_PROMPT_TOKENS = 16
VIBE_NEW_TOKENS = 48


# ----------------------------------------------------------------------------- helpers


class Stages:
    """Prints a numbered header per stage and records its wall time."""

    def __init__(self, console: Console, total: int):
        self.console, self.total, self.index = console, total, 0
        self.wall: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str, title: str):
        self.index += 1
        self.console.rule(f"[bold][{self.index}/{self.total}] {title}")
        start = time.perf_counter()
        yield
        self.wall[name] = time.perf_counter() - start
        self.console.print(f"[dim]{name}: {self.wall[name]:.1f} s (total {self.elapsed() / 60:.1f} min)[/dim]")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """A copy of `config` with `--set`-style overrides, validated like any recipe."""
    return config_from_dict(config.to_dict(), overrides)


def unigram_losses(data: DataConfig, vocab_size: int) -> dict[str, float]:
    """Cross-entropy (nats/token) of each source's validation tokens under the unigram distribution
    of its training tokens (add-1/2 smoothing): the loss of a model that ignores context."""
    from smoltrain.data.shards import TokenSource

    losses = {}
    for source, val_folder in data.validation.items():
        counts = np.zeros(vocab_size, dtype=np.int64)
        train = TokenSource(data.sources[source])
        chunk = np.empty(1 << 20, dtype=np.int64)
        for start in range(0, train.num_tokens, len(chunk)):
            part = chunk[: min(len(chunk), train.num_tokens - start)]
            train.read(start, part)
            counts += np.bincount(part, minlength=vocab_size)[:vocab_size]
        train.close()
        log_probs = np.log((counts + 0.5) / (counts.sum() + 0.5 * vocab_size))
        val = TokenSource(val_folder)
        tokens = np.empty(val.num_tokens, dtype=np.int64)
        val.read(0, tokens)
        val.close()
        losses[source] = float(-log_probs[tokens].mean())
    return losses


def matmul_peak_tflops(trials: int = 10, seconds: float = 0.1) -> float:
    """This CPU's fp32 matmul throughput, the best of short trials (a busy neighbour only lowers
    some of them): the peak MFU is quoted against on CPU, where the trainer's table of
    accelerators has no entry."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = 0.0
    for _ in range(trials):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            count += 1
        best = max(best, 2 * 1024**3 * count / (time.perf_counter() - start))
    return best / 1e12


def probe_tokens_per_s(config: Config, steps: int = 3) -> float:
    """Training tokens/s of the model on random tokens (forward, backward, AdamW), one micro-batch a
    step: the best step after a warm-up one, so a neighbour's burst does not shrink the plan."""
    from smoltrain.model.transformer import build_model

    model = build_model(config.model, seed=0, device="cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    shape = (config.train.micro_batch_size, config.data.seq_len)
    ids = torch.randint(0, config.model.vocab_size, shape)
    documents = torch.cumsum((torch.rand(shape) < 1 / 200).int(), dim=1).int()
    best = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        model(ids, labels=ids, document_ids=documents).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:
            best = max(best, ids.numel() / (time.perf_counter() - start))
    return best


def pretraining_seconds(budget_s: float, elapsed_s: float) -> float:
    """What is left of the budget after the final stages' reserves, but never less than the floor."""
    return max(budget_s - elapsed_s - EVAL_RESERVE_S - FIXED_RESERVE_S, PRETRAIN_FLOOR_SHARE * budget_s)


class Deadline:
    """The trainer's should_stop hook for the demo's time box: True once `seconds` (at least
    `minimum`) have passed since it was made; the trainer then finishes its step and saves."""

    def __init__(self, seconds: float, console: Console, minimum: float = 10.0):
        self.at = time.monotonic() + max(seconds, minimum)
        self.console = console
        self.fired = False

    def __call__(self) -> bool:
        if not self.fired and time.monotonic() >= self.at:
            self.fired = True
            self.console.print("  time budget reached: asking the trainer to stop after this step")
        return self.fired


def _warmup(config: Config, steps: int) -> int:
    """The recipe's warmup, shortened to a tenth of a budget too small for it."""
    return max(1, min(config.optim.warmup_steps, steps // 10))


def _prepare_out_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"{out} exists and is not a demo folder: choose another --out")
    for child in ("ablation", "pretrain", "hf", "figures", "report.md", "report.html", "eval.json"):
        path = out / child
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


# ----------------------------------------------------------------------------- the demo


def demo(out_dir: str = "runs/smoltrain-demo", minutes: float = 10.0, recipe: str | None = None,
         console: Console | None = None, suite_items: int = SUITE_ITEMS, ablation_steps: int | None = None,
         pretrain_steps: int | None = None) -> Path:
    """Run the whole pipeline; returns the path of the HTML report (markdown beside it).

    ablation_steps / pretrain_steps: fixed budgets (reproducible across machines) instead of the
    ones derived from `minutes` and the measured throughput."""
    from smoltrain.ablate.grid import ablate
    from smoltrain.ablate.spec import AblationSpec

    console = console or Console(highlight=False)
    if minutes <= 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    for name, value in (("--ablation-steps", ablation_steps), ("--pretrain-steps", pretrain_steps)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    recipe_path = Path(recipe) if recipe else RECIPE
    base = load_config(recipe_path)
    if not base.data.embedded:
        raise ConfigError(f"{recipe_path}: the demo trains on the embedded corpus (data.embedded: true)")
    out = Path(out_dir)
    _prepare_out_dir(out)
    budget_s = minutes * 60
    stages = Stages(console, 8)
    facts: dict = {"recipe": str(recipe_path), "minutes": minutes, "device": _device_name()}

    # 1. Data: corpus -> tokenizer -> shards (cached after the first run).
    with stages("data", "data: embedded corpus, tokenizer, shards"):
        from smoltrain.data.embedded import ensure_embedded_data

        data = ensure_embedded_data(base.data)
        manifest = json.loads((Path(data.tokenizer).parent / "manifest.json").read_text())
        for key, value in manifest["tokens"].items():
            console.print(f"  {key:<18} {value:>12,} tokens")
    facts["data"] = {"manifest": manifest, "cached": stages.wall["data"] < 0.5 * sum(manifest["timings"].values())}

    # 2. Reference points and budgets: the unigram loss per source, this machine's speed.
    with stages("baselines", "baselines and budget"):
        unigram = unigram_losses(data, base.model.vocab_size)
        console.print("  unigram loss (nats/token): " + ", ".join(f"{s} {v:.3f}" for s, v in unigram.items()))
        on_cpu = resolve_device(base.train.device).type == "cpu"
        peak = matmul_peak_tflops() if on_cpu else None  # on CUDA the trainer knows the accelerator's peak
        probe = probe_tokens_per_s(base) if peak is not None else None
        gbt = base.train.global_batch_tokens
        left = budget_s - stages.elapsed() - EVAL_RESERVE_S - FIXED_RESERVE_S
        if probe is not None:
            console.print(f"  probe: {probe:,.0f} tokens/s training; fp32 matmul peak {peak * 1e3:.1f} GFLOP/s")
        if ablation_steps is None:
            ablation_steps = int(np.clip(ABLATION_SHARE * left * probe / (4 * gbt), 6, 60)) if probe else 60
        console.print(f"  ablation budget: {ablation_steps} steps x {gbt:,} tokens per run, 4 runs")
        facts.update(unigram=unigram, peak_tflops=peak, probe_tokens_per_s=probe, ablation_steps=ablation_steps)

    # 3. Ablation: intra-document masking on/off, 2 seeds, judged against the seed-to-seed spread.
    with stages("ablation", "ablation: document masking on/off x 2 seeds"):
        raw = base.to_dict()
        raw["train"].update(eval_every=ablation_steps, save_every=ablation_steps, log_every=max(1, ablation_steps // 10),
                            tensorboard=False, peak_tflops=peak)
        raw["optim"]["warmup_steps"] = _warmup(base, ablation_steps)
        spec = AblationSpec(
            name="document-masking", baseline=raw, variants={"baseline": [], "no-document-masking": ["model.document_masking=false"]},
            seeds=[0, 1], budget_steps=ablation_steps, eval={"tasks": [], "val_batches": VAL_BATCHES},
            out_dir=str(out / "ablation"), source=f"{recipe_path} (smoltrain demo)",
        )
        ablation = ablate(spec=spec, console=console)
        runs = [r for arm in ablation["arms"].values() for r in arm["runs"]]
        # Plan for the machine undisturbed: the fastest run's tokens per wall second (its startup,
        # saves and evaluation included). If a neighbour slows the machine down later, the deadline
        # below keeps the time box.
        rate = max(r["tokens"] / r["wall_s"] for r in runs)
        facts["ablation"] = {"planning_tokens_per_s": rate}

    # 4. Pretraining: the time that is left at the machine's speed, with a hard deadline.
    with stages("pretrain", "pretrain the demo model"):
        from smoltrain.train.trainer import run as train

        elapsed = stages.elapsed()
        left = pretraining_seconds(budget_s, elapsed)
        steps = pretrain_steps or int(np.clip(0.95 * left * rate / gbt, 10, 5000))
        late = left > budget_s - elapsed - EVAL_RESERVE_S - FIXED_RESERVE_S
        console.print(f"  {left:.0f} s for pretraining at {rate:,.0f} tokens/s: {steps} steps, {steps * gbt:,} tokens"
                      + (" (the floor: earlier stages overran, so the demo ends late)" if late else ""))
        pretrain_config = with_overrides(base, [
            f"train.out_dir={json.dumps(str(out / 'pretrain'))}", f"train.max_steps={steps}",
            f"train.eval_every={max(1, steps // 4)}", f"train.save_every={steps}", f"train.log_every={max(1, steps // 50)}",
            "eval.tasks=[]", f"eval.val_batches={VAL_BATCHES}", f"train.peak_tflops={json.dumps(peak)}",
            f"optim.warmup_steps={_warmup(base, steps)}",
        ])
        # A machine that slows down mid-run (shared cores) must not blow the budget: at the deadline
        # the trainer stops as it would when preempted, finishing its step and saving a checkpoint.
        deadline = Deadline(left, console)
        summary = train(pretrain_config, should_stop=deadline)
        if summary["stopped_by"] and not deadline.fired:  # Ctrl-C or an outside SIGTERM: stop the demo too
            from smoltrain.errors import StoppedBySignal

            raise StoppedBySignal(summary["stopped_by"])
        if not summary["finished"]:
            console.print(f"  time budget reached: pretraining stopped at step {summary['step']} of {steps}")
        facts["pretrain"] = {"steps": steps, "summary": summary}

    # 5. Evaluation: validation loss per source and the embedded suite against its random baseline.
    with stages("evaluate", "evaluate: validation loss and the embedded suite"):
        from smoltrain.eval.run import evaluate
        from smoltrain.train.checkpoint import load_model_from_checkpoint

        model, _ = load_model_from_checkpoint(out / "pretrain", "cpu")
        eval_config = pretrain_config  # the same validation batches as during training: one curve
        result = evaluate(model, ["embedded"], config=eval_config, tokenizer=data.tokenizer, limit=suite_items, device="cpu",
                          out=out / "eval.json", progress=True)
        for source, v in result["val"].items():
            console.print(f"  val {source:<6} loss {v['loss']:.3f} (unigram {unigram[source]:.3f}), {v['bpb']:.3f} bits/byte")
        a = result["aggregate"]
        console.print(f"  suite: mean score {a['score']:.3f} vs random {a['random_baseline']:.3f}, centred {a['centred']:+.3f}")

    # 6. Export to Hugging Face and load it back with transformers.
    with stages("export", "export to Hugging Face and load with transformers"):
        hf_model, hf_tokenizer, export = export_and_reload(model, data, eval_config, out / "hf")
        console.print(f"  {export['architecture']} in {export['path']}: max |logit diff| {export['max_logit_diff']:.2e}, "
                      f"greedy continuation identical: {export['greedy_match']}")

    # 7. Vibe test: read what the model writes (evals missed SmolLM3's dropped system prompts; reading did not).
    with stages("vibe test", "vibe test: sample generations"):
        samples = vibe_test(hf_model, hf_tokenizer, data)
        for s in samples:
            console.print(f"  {s['source']:<6} {s['prompt']!r} -> {s['completion']!r}", markup=False, soft_wrap=True)

    # 8. One report (its own stage's time is known once the figures are drawn; writing is instant).
    with stages("report", "report"):
        from smoltrain.report.demo_report import add_wall_times, build_demo_report

        facts.update(export=export, samples=samples, eval=result, ablation_results=ablation)
        report = build_demo_report(out, facts, pretrain_config, stages.elapsed())
    add_wall_times(report, out / "figures", stages.wall, stages.elapsed())
    md_path, html_path = report.write(out)
    facts["wall_s"] = stages.wall
    (out / MARKER).write_text(json.dumps({k: facts[k] for k in ("recipe", "minutes", "device", "unigram", "peak_tflops",
                                                                  "probe_tokens_per_s", "ablation_steps", "wall_s")}, indent=2) + "\n")
    print_summary(console, facts, pretrain_config, stages.elapsed())
    console.print(f"report: {html_path} (markdown: {md_path})", soft_wrap=True)
    return html_path


# ----------------------------------------------------------------------------- export and vibe test


def export_and_reload(model, data: DataConfig, config: Config, hf_dir: Path):
    """Export, load with transformers, compare logits on validation text and greedy continuations."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smoltrain.data.loader import validation_batches
    from smoltrain.model.generate import generate
    from smoltrain.model.hf import export_hf

    path = export_hf(model, hf_dir, tokenizer=data.tokenizer)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    source = next(iter(data.validation))
    batch = next(iter(validation_batches(config, source, 1, 2)))
    with torch.no_grad():
        ours = model(batch["input_ids"])
        theirs = hf_model(input_ids=batch["input_ids"]).logits
        prompt = batch["input_ids"][0, :VIBE_PROMPT_TOKENS].tolist()
        greedy_ours = generate(model, [prompt], 24)[0]
        greedy_hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                      min_new_tokens=24, pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
    architecture = json.loads((path / "config.json").read_text())["architectures"][0]
    return hf_model, tokenizer, {
        "path": str(path), "architecture": architecture, "max_logit_diff": float((ours - theirs).abs().max()),
        "greedy_match": greedy_ours == greedy_hf, "files": sorted(p.name for p in path.iterdir()),
    }


def vibe_test(hf_model, tokenizer, data: DataConfig, per_source: int = 2) -> list[dict]:
    """Sampled continuations (temperature 0.8, top-k 40, seeded) of the openings of validation documents."""
    from smoltrain.data.shards import TokenSource

    samples = []
    torch.manual_seed(0)
    for source, folder in data.validation.items():
        tokens = TokenSource(folder)
        starts = [0] + [int(s) for s in tokens.document_starts(0, min(tokens.num_tokens, 200_000))]
        starts = [s for s in starts if s + VIBE_PROMPT_TOKENS <= tokens.num_tokens]
        for start in starts[:per_source]:
            prompt = np.empty(VIBE_PROMPT_TOKENS, dtype=np.int64)
            tokens.read(start, prompt)
            ids = torch.tensor([prompt.tolist()])
            with torch.no_grad():
                out = hf_model.generate(ids, max_new_tokens=VIBE_NEW_TOKENS, do_sample=True, temperature=0.8, top_k=40,
                                        pad_token_id=tokenizer.eos_token_id)
            samples.append({"source": source, "prompt": tokenizer.decode(prompt.tolist()),
                            "completion": tokenizer.decode(out[0, len(prompt):].tolist(), skip_special_tokens=True)})
        tokens.close()
    return samples


# ----------------------------------------------------------------------------- summary


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def print_summary(console: Console, facts: dict, config: Config, total_s: float) -> None:
    from smoltrain.model.flops import parameter_counts
    from smoltrain.report.run import median_of, read_metrics

    m = config.model
    train_rows, _ = read_metrics(config.train.out_dir)
    tps, mfu = median_of(train_rows, "tokens_per_s"), median_of(train_rows, "mfu")
    val, unigram = facts["eval"]["val"], facts["unigram"]
    a = facts["eval"]["aggregate"]
    summary = facts["pretrain"]["summary"]
    verdicts = [f"{v['metric']} {v['verdict']}" for v in facts["ablation_results"]["verdicts"] if v["metric"].endswith("loss")]
    lines = [
        f"model     {parameter_counts(m)['total'] / 1e6:.2f}M parameters ({m.num_layers} layers x {m.hidden_size}, "
        f"{m.num_heads}/{m.num_kv_heads} heads, {'tied' if m.tie_embeddings else 'untied'}), "
        f"{train_rows[-1]['tokens']:,} tokens in {train_rows[-1]['step']} steps"
        + ("" if summary["finished"] else f" (stopped by the time budget; {facts['pretrain']['steps']} planned)"),
        f"speed     {tps:,.0f} tokens/s median, {summary['tokens_per_s'] or 0:,.0f} on average"
        + (f"; MFU {100 * mfu:.1f}% (median) of this CPU's measured fp32 matmul peak" if mfu else ""),
        "val loss  " + " | ".join(f"{s} {v['loss']:.2f} (unigram {unigram[s]:.2f})" for s, v in val.items()),
        f"suite     mean score {a['score']:.3f} vs random {a['random_baseline']:.3f} (centred {a['centred']:+.3f})",
        "ablation  no-document-masking: " + ", ".join(verdicts),
        f"export    {facts['export']['architecture']}, max |logit diff| vs transformers "
        f"{facts['export']['max_logit_diff']:.1e}",
    ]
    console.rule(f"[bold]smoltrain demo: done in {total_s / 60:.1f} min")
    for line in lines:
        console.print(line, soft_wrap=True)


__all__ = ["demo", "unigram_losses", "matmul_peak_tflops", "probe_tokens_per_s", "export_and_reload", "vibe_test"]
