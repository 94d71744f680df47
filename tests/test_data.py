"""Offline datasets."""
import numpy as np
import pytest
import torch

from iterlayers import data


def test_digits_split_is_deterministic_and_standardized():
    a, b = data.load_digits(seed=3), data.load_digits(seed=3)
    assert a.x_train.shape == (1348, 64) and a.x_test.shape == (449, 64) and a.num_classes == 10
    torch.testing.assert_close(a.x_train, b.x_train)
    # Standardised on the training split only: zero mean, unit variance where the pixel varies.
    torch.testing.assert_close(a.x_train.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    assert a.y_train.dtype == torch.int64 and set(a.y_test.tolist()) == set(range(10))
    assert not torch.equal(data.load_digits(seed=4).x_train, a.x_train)


def test_mnist1d_is_generated_offline_and_leaves_numpy_rng_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = data.load_mnist1d(num_samples=200)
    assert np.array_equal(np.random.get_state()[1], before)
    assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)


def test_user_files_roundtrip(tmp_path):
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = np.arange(20) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = data.load_dataset(str(tmp_path / "d.npz"))
    assert ds.num_classes == 4 and ds.x_train.shape[0] + ds.x_test.shape[0] == 20
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(x[:, 0]), "x_test": torch.from_numpy(x[:5]),
                "y_test": torch.from_numpy(x[:5, 0])}, tmp_path / "r.pt")
    reg = data.load_file(tmp_path / "r.pt")
    assert reg.num_classes is None and reg.y_train.dtype == torch.float32 and reg.x_test.shape == (5, 3)


def test_bad_files_and_names(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; valid"):
        data.load_dataset("cifar")
    with pytest.raises(FileNotFoundError):
        data.load_file(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"missing arrays \['y'\]"):
        data.load_file(tmp_path / "bad.npz")
    np.savez(tmp_path / "len.npz", x=np.zeros((3, 2)), y=np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="3 rows but y has 4"):
        data.load_file(tmp_path / "len.npz")


def test_unreadable_files_are_typed_errors_naming_the_file(tmp_path):
    from iterlayers.errors import IterlayersError, ValidationError

    with pytest.raises(data.DatasetNotFoundError, match="does not exist") as info:
        data.load_file(tmp_path / "missing.npz")
    assert isinstance(info.value, IterlayersError) and isinstance(info.value, FileNotFoundError)
    np.savez(tmp_path / "ok.npz", x=np.zeros((4, 2)), y=np.arange(4))
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValidationError, match=r"cut.npz: .*(truncated or corrupted|corrupted)"):
        data.load_file(tmp_path / "cut.npz")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}] * 3, dtype=object), y=np.arange(3))
    with pytest.raises(ValidationError, match="obj.npz: cannot be read without executing code"):
        data.load_file(tmp_path / "obj.npz")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValidationError, match="junk.pt"):
        data.load_file(tmp_path / "junk.pt")
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(ValidationError, match="unsupported extension '.csv'"):
        data.load_file(tmp_path / "d.csv")
    np.savez(tmp_path / "scalar.npz", x=np.float64(1.0), y=np.int64(0))
    with pytest.raises(ValidationError, match="one row per sample"):
        data.load_file(tmp_path / "scalar.npz")
    with pytest.raises(ValidationError, match="test_fraction"):
        data.load_file(tmp_path / "ok.npz", test_fraction=1.0)
