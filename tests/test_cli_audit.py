"""`iterlayers analyze RUN --audit`: the gradient audit of a trained checkpoint, printed and written to audit.json."""
import json

import numpy as np
import pytest
import torch

from iterlayers import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    x = torch.randn(4, 16, generator=g)[y] + 0.5 * torch.randn(64, 16, generator=g)
    npz = tmp / "toy.npz"
    np.savez(npz, x=x.numpy(), y=y.numpy())
    out = tmp / "run"
    code = cli.main(["train", "--model", "deq_mlp", "--data", str(npz), "--epochs", "1", "--batch-size", "32",
                     "--option", "width=8", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_analyze_audit_prints_the_table_and_writes_audit_json(run_dir, tmp_path, capsys):
    capsys.readouterr()
    code = cli.main(["analyze", str(run_dir), "--batch-size", "8", "--audit", "--audit-batch", "4",
                     "--directions", "3", "--out", str(tmp_path / "a")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "gradient audit on 4 test samples" in text and "| implicit |" in text and "| jfb |" in text
    record = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert record["samples"] == 4 and record["n_directions"] == 3 and record["model"] == "deq_mlp"
    modes = {m["mode"]: m for m in record["modes"]}
    assert set(modes) == {"implicit", "phantom", "jfb", "unrolled"}
    assert record["reference_converged"] is True
    # The implicit gradient of a converged, contractive layer matches finite differences; JFB drops (I - J)^-1.
    assert modes["implicit"]["trusted"] and modes["implicit"]["rel_error"] < 1e-4
    assert modes["implicit"]["backward_converged"] is True
    assert modes["jfb"]["rel_error"] > modes["implicit"]["rel_error"]
    assert record["recommended"] in modes and modes[record["recommended"]]["trusted"]
    assert f"audit: {tmp_path / 'a' / 'audit.json'}" in text


def test_analyze_audit_writes_to_the_run_directory_by_default(run_dir, capsys):
    code = cli.main(["analyze", str(run_dir), "--batch-size", "4", "--audit", "--audit-batch", "2",
                     "--directions", "2"])
    assert code == 0, capsys.readouterr()
    assert json.loads((run_dir / "audit.json").read_text())["samples"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--audit-batch", "0"], "--audit-batch must be a positive integer, got 0"),
    (["--directions", "-1"], "--directions must be a positive integer, got -1"),
])
def test_bad_audit_options_are_one_line_errors(run_dir, argv, message, capsys):
    code = cli.main(["analyze", str(run_dir), "--audit", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err


def test_unwritable_out_fails_before_any_work(run_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = cli.main(["analyze", str(run_dir), "--audit", "--out", str(blocker / "sub")])
    captured = capsys.readouterr()
    assert code == 2 and "--out" in captured.err and "not a writable directory" in captured.err
    assert captured.out == ""  # nothing analysed
