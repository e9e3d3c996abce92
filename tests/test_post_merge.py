"""Model merging: identical models give the model, weights (1, 0) the first, a soup the hand average
(tied embedding once), slerp its endpoints and mergekit's formula; bad inputs are one-line errors."""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from smoltrain import cli
from smoltrain.config import config_from_dict
from smoltrain.data.tokenizer import save_tokenizer, train_tokenizer
from smoltrain.errors import CheckpointError, ConfigError
from smoltrain.model.transformer import build_model
from smoltrain.post.merge import last_checkpoints, merge, slerp
from smoltrain.report.hf_export import export_hf
from smoltrain.train.checkpoint import save_checkpoint
from smoltrain.train.load_model import load_any, save_model_folder

SHAPE = dict(vocab_size=300, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
             max_seq_len=64, tie_embeddings=True)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 30, 300, False), folder)
    return folder


def _config(**shape):
    return config_from_dict({"model": {**SHAPE, **shape}, "data": {"seq_len": 32},
                             "train": {"micro_batch_size": 1, "global_batch_tokens": 32}})


def _folder(path, seed, tokenizer, **shape):
    config = _config(**shape)
    save_model_folder(build_model(config.model, seed=seed), config, path, tokenizer=tokenizer)
    return path


def _weights(path):
    return load_file(path / "model.safetensors")


def test_merge_of_identical_models_is_the_model(tmp_path, tokenizer):
    a = _folder(tmp_path / "a", 1, tokenizer)
    merge([a, a, a], tmp_path / "m")
    want, got = _weights(a), _weights(tmp_path / "m")
    assert set(got) == set(want)
    for name in want:  # three equal float32 terms of 1/3 each: exact up to one rounding
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)


def test_weights_one_zero_give_the_first_model_bit_for_bit(tmp_path, tokenizer):
    a, b = _folder(tmp_path / "a", 1, tokenizer), _folder(tmp_path / "b", 2, tokenizer)
    merge([a, b], tmp_path / "m", weights=[1.0, 0.0])
    want, got = _weights(a), _weights(tmp_path / "m")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_soup_is_the_hand_average_and_the_tied_embedding_is_merged_once(tmp_path, tokenizer):
    paths = [_folder(tmp_path / f"m{i}", i, tokenizer) for i in range(3)]
    weights = [2.0, 1.0, 1.0]
    out = merge(paths, tmp_path / "soup", weights=weights)
    states = [_weights(p) for p in paths]
    got = _weights(out)
    assert "embed_tokens.weight" in got and "lm_head.weight" not in got
    for name in got:
        want = sum(w / 4 * s[name].double() for w, s in zip(weights, states))
        torch.testing.assert_close(got[name].double(), want, rtol=1e-6, atol=1e-7)
    # the result is a model folder that loads, computes, exports and records how it was made
    model, config, tok = load_any(out)
    assert tok is not None and config.model.tie_embeddings
    torch.testing.assert_close(model.embed_tokens.weight, got["embed_tokens.weight"])
    hidden = torch.randn(1, 32)
    torch.testing.assert_close(model.output(hidden), hidden @ got["embed_tokens.weight"].T)  # the head is the embedding
    assert json.loads((out / "merge.json").read_text())["weights"] == [0.5, 0.25, 0.25]
    export_hf(out, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()


def test_untied_models_merge_head_and_embedding_separately(tmp_path, tokenizer):
    a = _folder(tmp_path / "a", 1, tokenizer, tie_embeddings=False)
    b = _folder(tmp_path / "b", 2, tokenizer, tie_embeddings=False)
    got = _weights(merge([a, b], tmp_path / "m"))
    for name in ("embed_tokens.weight", "lm_head.weight"):
        torch.testing.assert_close(got[name], (_weights(a)[name] + _weights(b)[name]) / 2)


def test_bfloat16_output_is_the_float32_sum_cast_once(tmp_path, tokenizer):
    a, b = _folder(tmp_path / "a", 1, tokenizer), _folder(tmp_path / "b", 2, tokenizer)
    got = _weights(merge([a, b], tmp_path / "m", weights=[0.3, 0.7], dtype=torch.bfloat16))
    for name, t in got.items():
        assert t.dtype == torch.bfloat16
        want = (0.3 * _weights(a)[name] + 0.7 * _weights(b)[name]).to(torch.bfloat16)
        torch.testing.assert_close(t, want, rtol=0, atol=0)


def _mergekit_slerp(t, v0, v1, threshold=0.9995, eps=1e-8):
    """mergekit's numpy slerp, transcribed in float64."""
    v0c, v1c = v0.double(), v1.double()
    n0, n1 = v0c.norm(), v1c.norm()
    d0 = v0c / n0 if n0 > eps else v0c
    d1 = v1c / n1 if n1 > eps else v1c
    dot = float((d0 * d1).sum())
    if abs(dot) > threshold:
        return (1 - t) * v0c + t * v1c
    theta0 = math.acos(dot)
    s0 = math.sin(theta0 - theta0 * t) / math.sin(theta0)
    s1 = math.sin(theta0 * t) / math.sin(theta0)
    return s0 * v0c + s1 * v1c


def test_slerp_matches_mergekit_and_its_endpoints_are_the_models(tmp_path, tokenizer):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    for t in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(slerp(t, x, y).double(), _mergekit_slerp(t, x, y), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slerp(0.4, x, 2 * x), 0.6 * x + 0.8 * x)  # parallel: linear
    a, b = _folder(tmp_path / "a", 1, tokenizer), _folder(tmp_path / "b", 2, tokenizer)
    for t, source in ((0.0, a), (1.0, b)):
        got, want = _weights(merge([a, b], tmp_path / f"s{t}", method="slerp", t=t)), _weights(source)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_last_k_checkpoints_of_a_run_are_souped(tmp_path, tokenizer):
    config = _config()
    model = build_model(config.model, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path / "run"
    snapshots = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * step)
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
        save_checkpoint(run, step, model, optimizer, {"step": step}, config, keep=5)
    (run / "checkpoints" / "step_00000003" / "COMPLETE").unlink()  # an interrupted save is not used
    assert [p.name for p in last_checkpoints(run, 2)] == ["step_00000001", "step_00000002"]
    out = tmp_path / "soup"
    assert cli.main(["merge", "--last", "2", str(run), "--out", str(out)]) == 0
    got = _weights(out)
    for name in got:
        torch.testing.assert_close(got[name], (snapshots[1][name] + snapshots[2][name]) / 2)
    with pytest.raises(CheckpointError, match="2 complete checkpoint"):
        last_checkpoints(run, 3)


def test_cli_merge_eval_prints_inputs_and_merge_side_by_side(tmp_path, tokenizer, capsys):
    a, b = _folder(tmp_path / "a", 1, tokenizer), _folder(tmp_path / "b", 2, tokenizer)
    code = cli.main(["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--eval", "--tasks", "arithmetic_choice",
                     "--limit", "4", "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out  # a pipe: rich's 80 columns once cut the names
    assert "merge_eval.json" in printed and "arithmetic_choice" in printed
    table = (tmp_path / "m" / "merge_eval.md").read_text()
    assert "| task | metric | a | b | m |" in table and "| arithmetic_choice | acc |" in table
    result = json.loads((tmp_path / "m" / "merge_eval.json").read_text())
    assert list(result["reports"]) == [str(a), str(b), str(tmp_path / "m")]
    assert all(r["tasks"]["arithmetic_choice"]["n"] == 4 for r in result["reports"].values())


@pytest.mark.parametrize("case", ["shape", "arch", "tokenizer", "weights_len", "weights_neg", "slerp_three", "same_out", "missing"])
def test_bad_inputs_are_one_line_errors_naming_the_first_difference(tmp_path, tokenizer, capsys, case):
    a = _folder(tmp_path / "a", 1, tokenizer)
    b = _folder(tmp_path / "b", 2, tokenizer)
    cases = {
        "shape": (lambda: [str(a), str(_folder(tmp_path / "c", 3, tokenizer, intermediate_size=96))],
                  "model.intermediate_size is 96, not 64"),
        "arch": (lambda: [str(a), str(_folder(tmp_path / "c", 3, tokenizer, nope_every=2))], "model.nope_every is 2, not 0"),
        "tokenizer": (lambda: [str(a), str(_other_tokenizer_folder(tmp_path))], "their tokenizers differ \\(id \\d+ is"),
        "weights_len": (lambda: [str(a), str(b), "--weights", "1"], "--weights has 1 values for 2 models"),
        "weights_neg": (lambda: [str(a), str(b), "--weights", "1", "-1"], "--weights must be finite and >= 0"),
        "slerp_three": (lambda: [str(a), str(b), str(a), "--method", "slerp"], "slerp merges exactly 2 models"),
        "same_out": (lambda: [str(a), str(b)], "must differ from the inputs"),
        "missing": (lambda: [str(a), str(tmp_path / "nope")], "no such file or folder"),
    }
    make_args, message = cases[case]
    args = make_args()
    out = a if case == "same_out" else tmp_path / "out"
    assert cli.main(["merge", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("smoltrain merge: error:")
    assert re.search(message, err), err
    if case != "same_out":
        assert not (tmp_path / "out" / "config.yaml").exists()


def _other_tokenizer_folder(tmp_path):
    tok = tmp_path / "tok2"
    save_tokenizer(train_tokenizer(["completely different words entirely, zebra xylophone"] * 30, 300, False), tok)
    return _folder(tmp_path / "c", 3, tok)


def test_errors_of_the_library_call(tmp_path, tokenizer):
    a = _folder(tmp_path / "a", 1, tokenizer)
    with pytest.raises(ConfigError, match="--t must lie in"):
        merge([a, a], tmp_path / "o", method="slerp", t=1.5)
    with pytest.raises(ConfigError, match="--method must be one of"):
        merge([a, a], tmp_path / "o", method="ties")


def test_hugging_face_folders_and_model_folders_merge_together(tmp_path, tokenizer):
    a = _folder(tmp_path / "a", 1, tokenizer)
    export_hf(a, tmp_path / "hf")
    got, want = _weights(merge([tmp_path / "hf", a], tmp_path / "m")), _weights(a)
    assert all(torch.equal(got[n], want[n]) for n in want)  # (x + x) / 2 is exact in float32
