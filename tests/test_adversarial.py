"""FGSM / PGD: they stay in the eps-ball, follow the closed form on a linear model, and hurt a trained model."""
import pytest
import torch
from torch import nn

from iterlayers.adversarial import fgsm, pgd, project, robust_accuracy
from iterlayers.data import load_digits


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = load_digits(seed=0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(data.x_train), data.y_train).backward()
        opt.step()
    return model.eval(), data.x_test[:200], data.y_test[:200]


def _norms(d):
    d = d.reshape(d.shape[0], -1)
    return d.abs().amax(1), d.norm(dim=1)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_attacks_stay_in_ball_and_reduce_accuracy(trained, norm):
    model, x, y = trained
    eps = 0.3 if norm == "inf" else 2.0
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    for x_adv in (fgsm(model, x, y, eps, norm=norm), pgd(model, x, y, eps, norm=norm, steps=10, seed=0)):
        linf, l2 = _norms(x_adv - x)
        assert float((linf if norm == "inf" else l2).max()) <= eps + 1e-5  # float32 rounding of x + delta
        acc = (model(x_adv).argmax(1) == y).float().mean().item()
        assert acc < clean - 0.2
    a_f = (model(fgsm(model, x, y, eps, norm=norm)).argmax(1) == y).float().mean().item()
    a_p = (model(pgd(model, x, y, eps, norm=norm, steps=20, seed=0)).argmax(1) == y).float().mean().item()
    assert a_p <= a_f + 1e-9  # the iterative attack is at least as strong here
    accs = robust_accuracy(model, x, y, [0.0, eps / 2, eps], norm=norm, steps=10)
    assert accs[0.0] == pytest.approx(clean)
    assert accs[0.0] >= accs[eps / 2] >= accs[eps]


def test_fgsm_closed_form_on_linear_model():
    torch.manual_seed(1)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    xr = x.clone().requires_grad_(True)
    nn.functional.cross_entropy(lin(xr), y, reduction="sum").backward()
    g = xr.grad
    assert torch.allclose(fgsm(lin, x, y, 0.1), x + 0.1 * g.sign())
    assert torch.allclose(fgsm(lin, x, y, 0.5, norm="2"), x + 0.5 * g / g.norm(dim=1, keepdim=True))
    # float64 preserved, input untouched
    assert fgsm(lin, x, y, 0.1).dtype == torch.float64


def test_pgd_reproducible_clamped_and_projection():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.rand(10, 6), torch.randint(0, 3, (10,))
    a = pgd(model, x, y, 0.2, steps=5, seed=3, clamp=(0.0, 1.0))
    b = pgd(model, x, y, 0.2, steps=5, seed=3, clamp=(0.0, 1.0))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1 and (a - x).abs().max() <= 0.2 + 1e-7
    assert torch.equal(pgd(model, x, y, 0.0), x)
    d = torch.randn(7, 4) * 10
    p2 = project(d, 1.5, "2")
    assert torch.allclose(p2.norm(dim=1), torch.full((7,), 1.5))
    small = torch.full((1, 4), 0.1)
    assert torch.equal(project(small, 1.5, "2"), small)


def test_bad_arguments():
    lin = nn.Linear(3, 2)
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="norm"):
        fgsm(lin, x, y, 0.1, norm="1")
    with pytest.raises(ValueError, match="eps"):
        pgd(lin, x, y, -0.1)
    with pytest.raises(ValueError, match="steps"):
        pgd(lin, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="attack"):
        robust_accuracy(lin, x, y, [0.1], attack="cw")
    with pytest.raises(TypeError, match="floating"):
        fgsm(lin, torch.ones(2, 3, dtype=torch.long), y, 0.1)
