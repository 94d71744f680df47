"""A truncated, corrupted or mismatched checkpoint is one CheckpointError naming the file and what is wrong."""
import hashlib
import json
import pickle

import pytest
import torch
from torch import nn

from iterlayers import checkpoint as ck
from iterlayers.errors import CheckpointError, IterlayersError


def _save(directory, seed=0, step=1):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ck.save_checkpoint(directory, model_state=model.state_dict(), record={"config": {"x": 1}}, step=step)
    record = json.loads((directory / "checkpoint.json").read_text())
    return model, record, directory / record["weights"]


def _one_line(err) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


def test_the_json_records_the_sha256_of_the_weights_file(tmp_path):
    _, record, weights = _save(tmp_path)
    assert record["format"] == ck.FORMAT_VERSION == 2
    assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_weights_are_refused_by_their_hash(tmp_path, damage):
    _, _, weights = _save(tmp_path)
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-3] ^= 0xFF  # inside a tensor: still a well-formed safetensors file, only the hash tells
    else:
        data = bytearray()
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        ck.load_checkpoint(tmp_path)
    msg = _one_line(info.value)
    assert str(weights) in msg and "SHA-256" in msg and "truncated, corrupted" in msg


def test_weights_of_another_checkpoint_are_refused(tmp_path):
    _, _, weights = _save(tmp_path / "a", seed=0)
    _, _, other = _save(tmp_path / "b", seed=1)
    weights.write_bytes(other.read_bytes())  # a valid safetensors file, but not this checkpoint's
    with pytest.raises(CheckpointError, match="differs from .* recorded in checkpoint.json"):
        ck.load_checkpoint(tmp_path / "a")


def test_truncated_or_malformed_json(tmp_path):
    _save(tmp_path)
    path = tmp_path / "checkpoint.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError) as info:
        ck.load_checkpoint(tmp_path)
    msg = _one_line(info.value)
    assert str(path) in msg and "not valid JSON, the file is truncated or corrupted" in msg
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        ck.load_checkpoint(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object, got list"):
        ck.load_checkpoint(tmp_path)
    for weights in (None, "", "../elsewhere.safetensors", "/etc/passwd", 3):
        path.write_text(json.dumps({"format": 2, "weights": weights}))
        with pytest.raises(CheckpointError, match="'weights' must name a file beside it"):
            ck.load_checkpoint(tmp_path)
    path.write_text(json.dumps({"format": 2, "weights": "checkpoint-000000001.safetensors"}))
    with pytest.raises(CheckpointError, match="no 'weights_sha256' recorded"):
        ck.load_checkpoint(tmp_path)


def test_missing_files_are_file_not_found_and_of_the_family(tmp_path):
    with pytest.raises(ck.CheckpointNotFoundError, match="no checkpoint at"):
        ck.load_checkpoint(tmp_path)
    _, _, weights = _save(tmp_path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="names 'checkpoint-000000001.safetensors', which does not exist") as info:
        ck.load_checkpoint(tmp_path)
    assert isinstance(info.value, CheckpointError) and isinstance(info.value, IterlayersError)
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        ck.load_checkpoint(tmp_path / "w.txt")


def test_a_pickle_with_a_matching_hash_is_still_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    blob = pickle.dumps(Evil())
    (tmp_path / "checkpoint-000000001.safetensors").write_bytes(blob)
    (tmp_path / "checkpoint.json").write_text(json.dumps({
        "format": 2, "weights": "checkpoint-000000001.safetensors",
        "weights_sha256": hashlib.sha256(blob).hexdigest()}))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        ck.load_checkpoint(tmp_path)
    assert not marker.exists()


def test_format_1_without_a_hash_still_loads(tmp_path):
    model, record, _ = _save(tmp_path)
    del record["weights_sha256"]
    record["format"] = 1
    (tmp_path / "checkpoint.json").write_text(json.dumps(record))
    loaded = ck.load_checkpoint(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v)


def test_weights_that_do_not_fit_the_model(tmp_path):
    model, _, weights = _save(tmp_path)
    loaded = ck.load_checkpoint(tmp_path)
    twin = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    loaded.load_into(twin)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError) as info:
        loaded.load_into(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)))
    msg = _one_line(info.value)
    assert str(weights) in msg and "do not fit Sequential: shape mismatch 0.bias (4,) vs (5,)" in msg
    with pytest.raises(CheckpointError, match=r"missing 2.bias, 2.weight"):
        loaded.load_into(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected 1.bias, 1.weight"):
        loaded.load_into(nn.Sequential(nn.Linear(3, 4)))
