"""GGUF export: file size, time and logit error per dtype, against the Hugging Face export of the same model in one run.

    python bench/gguf_export.py MODEL [--dtypes float32,float16,bfloat16,q8_0] [--tokens 64]

MODEL is any folder `smoltrain export` takes (e.g. `smoltrain import` of the registry's SmolLM2-135M
GGUF). Each file is read back through transformers' GGUF loader; the error is the largest |logit|
difference from our float32 model on one seeded batch, and top-1 is how often the argmax agrees.
Not named gguf.py: a script's folder is first on sys.path and would shadow the gguf package.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtypes", default="float32,float16,bfloat16,q8_0")
    p.add_argument("--tokens", type=int, default=64, help="tokens of the seeded batch (2 rows)")
    args = p.parse_args()

    import torch
    import transformers

    from smoltrain.report.gguf_export import export_gguf
    from smoltrain.report.hf_export import export_hf
    from smoltrain.train.load_model import load_any

    torch.manual_seed(0)
    ours, config, _ = load_any(args.model)
    x = torch.randint(0, config.model.vocab_size, (2, args.tokens))
    with torch.no_grad():
        reference = ours(x).float()
    print(f"# {args.model}: {sum(t.numel() for t in ours.state_dict().values()) / 1e6:.0f}M parameters, "
          f"logits up to {reference.abs().max().item():.1f} in magnitude; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {platform.processor() or platform.machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        export_hf(args.model, Path(tmp) / "hf", dtype=torch.float32)
        peer_s = time.perf_counter() - started
        print(f"Hugging Face export (float32, the peer): {peer_s:.1f} s")
        print("| dtype | MB | export s | / HF export | max abs logit diff | top-1 agreement |")
        print("|---|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            file = Path(tmp) / f"m-{dtype}.gguf"
            started = time.perf_counter()
            export_gguf(args.model, file, dtype=dtype)
            seconds = time.perf_counter() - started
            theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=file.name, dtype=torch.float32)
            with torch.no_grad():
                logits = theirs(x).logits
            error = (logits - reference).abs().max().item()
            top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            print(f"| {dtype} | {file.stat().st_size / 1e6:.0f} | {seconds:.1f} | {seconds / peer_s:.2f} | {error:.2e} | {top1:.3f} |")
            file.unlink()
            del theirs


if __name__ == "__main__":
    main()
