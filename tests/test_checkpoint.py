"""Checkpoints: exact round trip, atomic replacement, and loading that never runs code."""
import json
import pickle

import pytest
import torch
from torch import nn

from iterlayers import checkpoint as ck


def _trained_pair(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
    return model, opt


def test_round_trip_is_bitwise_exact_and_training_continues_identically(tmp_path):
    model, opt = _trained_pair()
    rec = {"config": {"lr": 0.01, "name": "x"}, "progress": {"epoch": 2, "step_in_epoch": 5, "global_step": 17},
           "accum": [0.1 + 0.2, 1e-300, 3.0], "rng": ck.rng_state()}
    ck.save_checkpoint(tmp_path, model_state=model.state_dict(), optimizer_state=opt.state_dict(), record=rec, step=17)
    expected_rand = torch.rand(5)

    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.progress == rec["progress"] and loaded.config == rec["config"]
    assert loaded.record["accum"] == rec["accum"]  # floats survive JSON exactly
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v)

    model2, _ = _trained_pair(seed=1)
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(loaded.model_state)
    opt2.load_state_dict(loaded.optimizer_state)
    ck.set_rng_state(loaded.record["rng"])
    assert torch.equal(torch.rand(5), expected_rand)
    # One more identical step on both: the restored optimizer (Adam moments, step count) behaves identically.
    x = torch.randn(4, 5)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, opt = _trained_pair()
    ck.save_checkpoint(tmp_path, model_state=model.state_dict(), record={"progress": {"global_step": 1}}, step=1)
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    # Crash while writing the JSON pointer (after the new tensor file was written).
    monkeypatch.setattr(ck, "atomic_write_text", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, model_state=model.state_dict(), record={"progress": {"global_step": 2}}, step=2)
    monkeypatch.undo()
    loaded = ck.load_checkpoint(tmp_path)
    assert loaded.progress["global_step"] == 1
    for k, v in old.items():
        assert torch.equal(loaded.model_state[k], v)

    # Crash inside the tensor write itself: no temporary file is left behind.
    monkeypatch.setattr(ck, "_st_save", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(tmp_path, model_state=model.state_dict(), record={"progress": {"global_step": 3}}, step=3)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert ck.load_checkpoint(tmp_path).progress["global_step"] == 1


def test_old_tensor_files_are_removed_after_a_successful_save(tmp_path):
    model, _ = _trained_pair()
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, model_state=model.state_dict(), record={}, step=step)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["checkpoint-000000003.safetensors"]


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "checkpoint-000000001.safetensors").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": ck.FORMAT_VERSION,
                                                          "weights": "checkpoint-000000001.safetensors"}))
    with pytest.raises(Exception):
        ck.load_checkpoint(tmp_path)
    assert not marker.exists()


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ck.load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format": 99, "weights": "x"}))
    with pytest.raises(ValueError, match="unsupported checkpoint format 99"):
        ck.load_checkpoint(tmp_path)
