"""GGUF export for llama.cpp: any model `load_any` reads -> one .gguf file with weights, tokenizer and chat template.

The model goes through `export_hf` first (a temporary Hugging Face folder), so the architecture choice,
tokenizer files and special ids are the ones the HF export uses; this module only renames tensors the
way llama.cpp's convert_hf_to_gguf.py does and writes them with the `gguf` package.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from smoltrain.errors import CheckpointError
from smoltrain.files import write_atomic

# What llama.cpp names each Hugging Face architecture we export. Llama and SmolLM3 store q/k rows
# in GGML's interleaved RoPE order (the converter permutes them); Qwen3 keeps HF's rotate-half order.
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "SmolLM3ForCausalLM": "smollm3", "Qwen3ForCausalLM": "qwen3",
                      "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe", "Gemma3ForCausalLM": "gemma3"}
# Why an architecture the Hugging Face export writes has no GGUF export. llama.cpp's qwen3next graph has routed
# experts (and a shared expert) in every layer (tests/test-llama-archs.cpp lists it as moe_mandatory); ours is dense.
NOT_EXPORTED = {"Qwen3NextForCausalLM": "llama.cpp's qwen3next has experts in every layer and smoltrain's "
                                        "gated-DeltaNet hybrid is dense, so no GGUF file can hold it"}
PERMUTED_QK = {"llama", "smollm3"}
# What llama.cpp's MoE graphs hard-code (src/models/qwen3moe.cpp, olmoe.cpp): build_moe_ffn's norm_w argument
# (renormalise the top-k softmax weights) is true for qwen3moe and false for olmoe, and every layer has experts.
LLAMA_CPP_NORM_TOPK = {"qwen3moe": True, "olmoe": False}
# llama.cpp hard-codes SmolLM3's NoPE step (src/models/smollm3.cpp: no RoPE where (layer + 1) % 4 == 0);
# no GGUF key can say another one.
LLAMA_CPP_NOPE_EVERY = 4
DTYPES = ("float32", "float16", "bfloat16", "q8_0")
# What llama.cpp hard-codes for gemma3 (src/llama-model.cpp, LLM_ARCH_GEMMA3): a global layer every 6th
# (set_swa_pattern(6)), RoPE base 10000 on the local layers, and the attention scale head_dim ** -0.5
# (hidden / heads for the 62-layer 27B); the GGUF keys say only the window and the global RoPE base.
LLAMA_CPP_GEMMA3_GLOBAL_EVERY = 6
LLAMA_CPP_GEMMA3_LOCAL_THETA = 10000.0
LLAMA_CPP_GEMMA3_27B_LAYERS = 62


# ----------------------------------------------------------------------------- architecture


def gguf_architecture(hf_config: dict) -> str:
    """llama.cpp's architecture name for a config.json `export_hf` wrote; refuses what it cannot express."""
    from smoltrain.model.hf import from_hf_config

    architecture = hf_config["architectures"][0]
    if architecture in NOT_EXPORTED or architecture not in GGUF_ARCHITECTURES:
        why = NOT_EXPORTED.get(architecture, f"no GGUF export is written for {architecture}")
        raise CheckpointError(f"{why}; export to a Hugging Face folder instead")
    model = from_hf_config(hf_config)
    if architecture == "Gemma3ForCausalLM":
        return _gemma3_architecture(model)
    if model.num_experts > 0:
        return _moe_architecture(model, GGUF_ARCHITECTURES[architecture])
    rope_layers = [model.uses_rope(i) for i in range(model.num_layers)]
    if all(rope_layers):
        return "qwen3" if model.qk_norm else "llama"  # all-RoPE SmolLM3 (odd head_dim) is llama with key_length
    if model.position_encoding == "none" or model.nope_every != LLAMA_CPP_NOPE_EVERY:
        pattern = "no positional encoding" if model.position_encoding == "none" else f"model.nope_every={model.nope_every}"
        raise CheckpointError(
            f"llama.cpp cannot represent {pattern}: its SmolLM3 architecture hard-codes NoPE in every "
            f"{LLAMA_CPP_NOPE_EVERY}th layer (export to a Hugging Face folder instead)"
        )
    return GGUF_ARCHITECTURES[architecture]


def _moe_architecture(model, arch: str) -> str:
    """qwen3moe or olmoe, when llama.cpp's graph for it computes this model's routing; else a one-line refusal.
    (A shared expert or the loss-free routing bias never gets here: the Hugging Face export refuses them.)"""
    dense = [i for i in range(model.num_layers) if not model.is_moe_layer(i)]
    if dense:
        key = f"model.moe_every={model.moe_every}" if model.moe_every != 1 else f"model.moe_dense_layers={list(model.moe_dense_layers)}"
        problem = f"{key} (dense layers {dense}: its {arch} has experts in every layer)"
    elif model.norm_topk_prob != LLAMA_CPP_NORM_TOPK[arch]:
        always = "always renormalises" if LLAMA_CPP_NORM_TOPK[arch] else "never renormalises"
        problem = f"model.norm_topk_prob={model.norm_topk_prob} (its {arch} {always} the top-k router weights)"
    elif arch == "olmoe" and model.num_kv_heads != model.num_heads:
        # llama.cpp sizes olmoe's attn_k_norm as the full hidden width, so the K projection must be as wide.
        problem = f"model.num_kv_heads={model.num_kv_heads} (its olmoe has no grouped-query attention: num_heads={model.num_heads})"
    else:
        return arch
    raise CheckpointError(f"llama.cpp cannot represent {problem}; export to a Hugging Face folder instead")


def _gemma3_architecture(model) -> str:
    """gemma3, when this model's layer pattern, local RoPE base and attention scale are the ones llama.cpp
    hard-codes (see LLAMA_CPP_GEMMA3_*); else a one-line refusal naming the key."""
    llama_cpp_local = [(i + 1) % LLAMA_CPP_GEMMA3_GLOBAL_EVERY != 0 for i in range(model.num_layers)]
    head_dim = model.resolved_head_dim
    scale = model.hidden_size // model.num_heads if model.num_layers == LLAMA_CPP_GEMMA3_27B_LAYERS else head_dim
    local_theta = model.rope_local_theta if model.rope_local_theta is not None else model.rope_theta
    if [model.is_local_layer(i) for i in range(model.num_layers)] != llama_cpp_local:
        problem = (f"model.sliding_window={model.sliding_window} with model.global_every={model.global_every} "
                   f"(its gemma3 has a sliding window on every layer but each {LLAMA_CPP_GEMMA3_GLOBAL_EVERY}th)")
    elif local_theta != LLAMA_CPP_GEMMA3_LOCAL_THETA:
        problem = f"model.rope_local_theta={local_theta:g} (its gemma3 uses {LLAMA_CPP_GEMMA3_LOCAL_THETA:g} on local layers)"
    elif (model.query_pre_attn_scalar or head_dim) != scale:
        problem = f"model.query_pre_attn_scalar={model.query_pre_attn_scalar} (its gemma3 scales attention by {scale} ** -0.5)"
    else:
        return "gemma3"
    raise CheckpointError(f"llama.cpp cannot represent {problem}; export to a Hugging Face folder instead")


def _permute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """HF's rotate-half rows -> GGML's interleaved pairs, per head (transformers' GGUF loader undoes it)."""
    return w.reshape(num_heads, 2, w.shape[0] // num_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- tokenizer


def _pre_tokenizer_name(spec: dict, where: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json's pre-tokenizer: it picks the split regex
    llama.cpp applies. Matched on the pre-tokenizer itself, since our tokenizers are trained here and
    llama.cpp's own table keys on hashes of released vocabularies."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    from smoltrain.data.tokenizer import SPLIT_PATTERN as LLAMA3_SPLIT

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["Split", "ByteLevel"]:
        regex = steps[0].get("pattern", {}).get("Regex")
        name = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}.get(regex)
        if name is not None:
            return name
    elif kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    elif kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    raise CheckpointError(
        f"{where}: llama.cpp has no pre-tokenizer matching this one ({' + '.join(map(str, kinds))}); "
        "exportable: byte-level BPE split as Llama 3, Qwen2, GPT-2 or SmolLM2"
    )


def _token_table(tokenizer_json: Path, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id of the model's vocabulary with its llama.cpp token type: special added tokens are CONTROL,
    other added tokens USER_DEFINED, ids past the tokenizer (a vocabulary padded for speed) UNUSED."""
    import gguf
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    added = tok.get_added_tokens_decoder()
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"{tokenizer_json}: token id {max(by_id)} is outside the model's vocabulary of {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _add_tokenizer(writer, hf_dir: Path, vocab_size: int) -> None:
    """Vocabulary, merges, special ids and the chat template, under llama.cpp's keys."""
    import gguf

    tokenizer_json = hf_dir / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise CheckpointError("a GGUF file needs the tokenizer and this model knows none: pass --tokenizer")
    spec = json.loads(tokenizer_json.read_text())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not model.get("merges"):
        raise CheckpointError(f"{tokenizer_json}: only byte-level BPE tokenizers can be exported to GGUF, found {model.get('type')}")
    tokens, types = _token_table(tokenizer_json, vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec, tokenizer_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=vocab_size)
    # Whether BOS / EOS are added is what transformers does with these files, stated always: without the
    # key llama.cpp adds a BOS for Llama-3 vocabularies, which ours (no BOS) would then not match.
    special.add_special_token.update(_added_special_tokens(hf_dir))
    special.add_to_gguf(writer, quiet=True)


def _added_special_tokens(hf_dir: Path) -> dict[str, bool]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    return {
        "bos": full[:1] != plain[:1] and full[0] == tokenizer.bos_token_id,
        "eos": full[-1:] != plain[-1:] and full[-1] == tokenizer.eos_token_id,
    }


# ----------------------------------------------------------------------------- tensors


def _encode(array: np.ndarray, dtype: str, gguf_name: str):
    """(data, raw GGML type or None) for one tensor: norms (1-D) and MoE routers (ffn_gate_inp) stay float32
    as in llama.cpp's converter, and a matrix whose rows are not whole Q8_0 blocks of 32 falls back to float16."""
    import gguf

    if array.ndim == 1 or dtype == "float32" or ".ffn_gate_inp." in gguf_name:
        return array, None
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if dtype == "bfloat16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return array.astype(np.float16), None


def _hf_tensors(hf_dir: Path, arch: str) -> dict[str, torch.Tensor]:
    """The folder's tensors in float32, each MoE layer's per-expert Linears stacked into one (E, out, in)
    tensor as llama.cpp's ffn_*_exps are. olmoe needs an output matrix even when tied (qwen3moe's is optional).
    Gemma 3's embedding is stored unscaled: llama.cpp multiplies by sqrt(hidden) itself, as HF does."""
    from safetensors.torch import load_file

    from smoltrain.model.family import stack_experts

    tensors = {name: t.float() for name, t in load_file(hf_dir / "model.safetensors").items()}
    if any(".mlp.experts." in name for name in tensors):
        tensors = {name: t for name, t in stack_experts(tensors).items() if not name.endswith(".expert_bias")}
    if arch == "olmoe" and "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    if arch == "gemma3":  # HF's Gemma3RMSNorm computes x * (1 + w); llama.cpp's plain RMSNorm reads the (1 + w) stored
        tensors = {name: t + 1 if name.endswith("norm.weight") else t for name, t in tensors.items()}
    return tensors


def _add_tensors(writer, hf_dir: Path, hf_config: dict, arch: str, dtype: str) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], hf_config["num_hidden_layers"])
    heads = {"q_proj": hf_config["num_attention_heads"], "k_proj": hf_config["num_key_value_heads"]}
    for name, tensor in _hf_tensors(hf_dir, arch).items():
        projection = name.split(".")[-2]
        if arch in PERMUTED_QK and projection in heads:
            tensor = _permute_qk(tensor, heads[projection])
        gguf_name = names.get_name(name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise CheckpointError(f"{hf_dir}: llama.cpp's {arch} has no tensor for {name}")
        gguf_name += "" if gguf_name.endswith(".weight") else ".weight"
        data, raw_dtype = _encode(tensor.numpy(), dtype, gguf_name)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)


# ----------------------------------------------------------------------------- file


def _add_hyperparameters(writer, hf_config: dict, name: str, dtype: str) -> None:
    import gguf

    file_types = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                  "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    head_dim = hf_config["head_dim"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(hf_config["vocab_size"])
    writer.add_context_length(hf_config["max_position_embeddings"])
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_block_count(hf_config["num_hidden_layers"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(hf_config["num_attention_heads"])
    writer.add_head_count_kv(hf_config["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = hf_config["rope_parameters"]
    writer.add_rope_freq_base(rope["full_attention"]["rope_theta"] if "full_attention" in rope else rope["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    if "sliding_window" in hf_config and hf_config["architectures"][0] == "Gemma3ForCausalLM":
        writer.add_sliding_window(hf_config["sliding_window"])
    _add_moe_hyperparameters(writer, hf_config)


def _add_moe_hyperparameters(writer, hf_config: dict) -> None:
    """Expert count, experts per token, and (qwen3moe) the expert width; olmoe's experts are feed_forward_length
    wide. Read through our config parser, since config.json names the expert count num_experts or num_local_experts."""
    from smoltrain.model.hf import from_hf_config

    model = from_hf_config(hf_config)
    if model.num_experts == 0:
        return
    writer.add_expert_count(model.num_experts)
    writer.add_expert_used_count(model.experts_per_token)
    if "moe_intermediate_size" in hf_config:
        writer.add_expert_feed_forward_length(model.resolved_expert_hidden)


def write_gguf(hf_dir: Path, out: Path, dtype: str, name: str) -> str:
    """A Hugging Face folder `export_hf` wrote -> `out` (atomically). Returns llama.cpp's architecture name."""
    import gguf

    hf_config = json.loads((hf_dir / "config.json").read_text())
    arch = gguf_architecture(hf_config)
    logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # it lists the temporary file name at INFO

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _add_hyperparameters(writer, hf_config, name, dtype)
        _add_tokenizer(writer, hf_dir, hf_config["vocab_size"])
        _add_tensors(writer, hf_dir, hf_config, arch, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    write_atomic(out, write)
    return arch


def export_gguf(
    path: str | os.PathLike, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None, dtype: str | None = None
) -> str:
    """`smoltrain export MODEL --gguf out.gguf`: a model, HF, run or checkpoint folder -> one GGUF file.

    dtype: float32, float16, bfloat16 or q8_0; default the dtype the weights are stored in. Returns
    llama.cpp's architecture name (llama, smollm3, qwen3, qwen3moe, olmoe or gemma3).
    """
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise CheckpointError("writing GGUF needs the gguf package (pip install 'smoltrain[gguf]')") from None
    from smoltrain.report.hf_export import export_hf

    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if out.is_dir():
        raise CheckpointError(f"{out}: is a folder; --gguf takes a file name such as model.gguf")
    if not out.parent.is_dir():
        raise CheckpointError(f"{out.parent}: no such folder for the GGUF file")
    # The temporary HF folder sits beside the output (same disk), and goes when done or on error.
    hf_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        export_hf(path, hf_dir, tokenizer=tokenizer)
        stored = json.loads((hf_dir / "config.json").read_text())["dtype"]
        return write_gguf(hf_dir, out, dtype or stored, Path(path).name)
    finally:
        shutil.rmtree(hf_dir, ignore_errors=True)


__all__ = ["DTYPES", "export_gguf", "gguf_architecture", "write_gguf"]
