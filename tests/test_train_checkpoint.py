"""Checkpoints: exact round trip, atomicity (an interrupted save never looks complete), corrupt or
truncated checkpoints detected with fallback to the previous one, pruning, loading for export."""

import json
import logging

import pytest
import torch

import smoltrain.train.checkpoint as ckpt
from smoltrain.config import config_from_dict
from smoltrain.errors import CheckpointError
from smoltrain.model.transformer import build_model
from smoltrain.train.optim import build_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **model):
    return config_from_dict({
        "model": {"vocab_size": 64, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                  "intermediate_size": 32, "max_seq_len": 16, **model},
        "data": {"seq_len": 16},
        "train": {"out_dir": str(tmp_path / "run"), "global_batch_tokens": 32, "micro_batch_size": 2},
    })


def _trained(config, steps=2, seed=0):
    model = build_model(config.model, seed=seed)
    optimizer = build_optimizer(config.optim, model)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, config.model.vocab_size, (2, 16), generator=generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _save(config, model, optimizer, step, keep=3):
    return ckpt.save_checkpoint(config.train.out_dir, step, model, optimizer, {"step": step, "tokens": 32 * step},
                                config, keep=keep)


def test_round_trip_restores_weights_optimizer_state_and_rng_exactly(tmp_path):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    torch.manual_seed(123)
    path = _save(config, model, optimizer, 2)
    expected_draw = torch.rand(5)

    fresh_model, fresh_optimizer = _trained(config, steps=1, seed=1)  # different weights and moments
    torch.manual_seed(999)
    state = ckpt.load_checkpoint(path, fresh_model, fresh_optimizer)

    assert state["step"] == 2 and state["tokens"] == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), name
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    for i in saved["state"]:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved["state"][i][key], loaded["state"][i][key])
    assert torch.equal(torch.rand(5), expected_draw)  # RNG continues where the save left it


def test_latest_names_the_newest_complete_checkpoint_and_old_ones_are_pruned(tmp_path):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    for step in (1, 2, 3, 4):
        _save(config, model, optimizer, step, keep=2)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    assert (root / "latest").read_text().strip() == "step_00000004"
    assert ckpt.find_checkpoint(tmp_path / "run") == root / "step_00000004"


def test_a_save_interrupted_before_its_marker_is_never_used(tmp_path, monkeypatch):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    _save(config, model, optimizer, 1)

    class Crash(Exception):
        pass

    def crash(point):
        if point == "save_2_after_data":
            raise Crash

    monkeypatch.setattr(ckpt, "crash_point", crash)
    with pytest.raises(Crash):
        _save(config, model, optimizer, 2)
    root = tmp_path / "run" / "checkpoints"
    assert (root / ".step_00000002.tmp").is_dir()  # the data is there ...
    assert not (root / "step_00000002").exists()  # ... but it never got its final name
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert ckpt.find_checkpoint(tmp_path / "run") == root / "step_00000001"
    monkeypatch.undo()
    _save(config, model, optimizer, 3)  # the next save clears the leftover
    assert not (root / ".step_00000002.tmp").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_marker", "bad_state"])
def test_a_corrupt_or_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    _save(config, model, optimizer, 1)
    newest = _save(config, model, optimizer, 2)
    data = newest / "__0_0.distcp"
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:-100])
    elif damage == "flip_byte":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "no_marker":
        (newest / ckpt.MARKER).unlink()
    else:
        (newest / ckpt.TRAIN_STATE).write_text('{"step": 2, "tok')  # a torn write
    with caplog.at_level(logging.WARNING):
        found = ckpt.find_checkpoint(tmp_path / "run")
    assert found == tmp_path / "run" / "checkpoints" / "step_00000001"
    assert "step_00000002" in caplog.text and "unusable" in caplog.text
    # Asking for the damaged one explicitly falls back the same way.
    assert ckpt.find_checkpoint(newest, required=True) == found


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    only = _save(config, model, optimizer, 1)
    (only / ckpt.MARKER).unlink()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ckpt.find_checkpoint(tmp_path / "run")
    assert ckpt.find_checkpoint(tmp_path / "fresh") is None
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        ckpt.find_checkpoint(tmp_path / "fresh", required=True)


def test_load_model_from_checkpoint_accepts_run_and_checkpoint_folders(tmp_path):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    path = ckpt.save_checkpoint(config.train.out_dir, 5, model, optimizer, {"step": 5, "rope_theta": 50000.0},
                                config, keep=2)
    for where in (tmp_path / "run", path):
        loaded, loaded_config = ckpt.load_model_from_checkpoint(where)
        assert loaded_config.model.rope_theta == 50000.0  # the stage's RoPE base, not the recipe's
        assert loaded.rope_theta == 50000.0
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), name
        ids = torch.randint(0, 64, (1, 8))
        assert torch.isfinite(loaded(ids)).all()


def test_resuming_into_another_model_shape_is_a_one_line_error(tmp_path):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    path = _save(config, model, optimizer, 1)
    with pytest.raises(CheckpointError, match=r"model.hidden_size: 16 in the checkpoint, 32 now"):
        ckpt.check_compatible(path, _config(tmp_path, hidden_size=32))


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    config = _config(tmp_path)
    model, optimizer = _trained(config)
    path = _save(config, model, optimizer, 1)
    manifest = json.loads((path / ckpt.MARKER).read_text())
    on_disk = {p.name for p in path.iterdir()} - {ckpt.MARKER}
    assert set(manifest["files"]) == on_disk
    assert {".metadata", ckpt.TRAIN_STATE, ckpt.CONFIG} <= on_disk
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
