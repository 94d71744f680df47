"""DEQ classifiers: normalisations hold exactly, fixed points are fixed points, gradients are right."""
import pytest
import torch
from torch.nn import functional as F

from iterlayers.models import MODELS, build_model
from iterlayers.models.deq_conv import ConvCell, DEQConv
from iterlayers.models.deq_mlp import DEQMLP, MLPCell

f64 = torch.float64


def test_spectral_norm_is_exactly_gamma_and_the_cell_contracts():
    torch.manual_seed(0)
    cell = MLPCell(12, gamma=0.7).double()
    with torch.no_grad():
        cell.v.mul_(5.0).add_(torch.randn(12, 12, dtype=f64))
    sv = torch.linalg.svdvals(cell.weight().detach())
    assert float(sv[0]) == pytest.approx(0.7, rel=1e-12)
    u = torch.randn(50, 12, dtype=f64)
    z1, z2 = torch.randn(50, 12, dtype=f64), torch.randn(50, 12, dtype=f64)
    lhs = (cell(z1, u) - cell(z2, u)).norm(dim=1)
    assert bool((lhs <= 0.7 * (z1 - z2).norm(dim=1) + 1e-12).all())


def test_weight_norm_rows_have_norm_g():
    torch.manual_seed(1)
    cell = MLPCell(6, norm="weight", activation="relu").double()
    with torch.no_grad():
        cell.g.copy_(torch.arange(1, 7, dtype=f64))
    torch.testing.assert_close(cell.weight().norm(dim=1), torch.arange(1, 7, dtype=f64))


def test_deq_mlp_output_is_the_dense_fixed_point():
    torch.manual_seed(2)
    model = DEQMLP(5, 3, width=7, atol=1e-12, max_iter=200).double()
    x = torch.randn(9, 5, dtype=f64)
    logits = model(x)
    u = model.inject(x)
    z = torch.zeros_like(u)
    with torch.no_grad():
        for _ in range(600):  # plain Picard: 0.9^600 ~ 1e-28
            z = model.cell(z, u)
        expected = model.head(z)
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=1e-10)
    assert model.deq.stats["forward"].status == "converged"


def test_deq_mlp_implicit_gradient_passes_gradcheck():
    torch.manual_seed(3)
    model = DEQMLP(4, 2, width=5, atol=1e-13, max_iter=300, backward_atol=1e-13, backward_max_iter=300).double()
    x = torch.randn(3, 4, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: model(inp), (x,), eps=1e-6, atol=1e-6)


def test_deq_mlp_parameter_gradient_matches_the_dense_ift_formula():
    torch.manual_seed(4)
    model = DEQMLP(4, 3, width=6, atol=1e-13, max_iter=300, backward_atol=1e-13, backward_max_iter=300).double()
    x, y = torch.randn(2, 4, dtype=f64), torch.tensor([0, 2])
    F.cross_entropy(model(x), y).backward()
    got = model.cell.v.grad.clone()
    # Dense: z* = tanh(W z* + u); dl/dz* = g; adjoint a = (I - J)^{-T} g with J = diag(1 - z*^2) W;
    # dl/dW = sum_i (diag(1 - z_i^2) a_i) z_i^T, then chain through W = gamma V / ||V||_2 by autograd.
    with torch.no_grad():
        u = model.inject(x)
        z = torch.zeros_like(u)
        for _ in range(800):
            z = model.cell(z, u)
    W = model.cell.weight().detach()
    zr = z.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(model.head(zr), y), zr)[0]
    dW = torch.zeros_like(W)
    for i in range(2):
        d = 1 - z[i] ** 2
        J = d[:, None] * W
        a = torch.linalg.solve((torch.eye(6, dtype=f64) - J).T, g[i])
        dW += torch.outer(d * a, z[i])
    v = model.cell.v.detach().clone().requires_grad_(True)
    Wv = model.cell.gamma * v / torch.linalg.matrix_norm(v, ord=2)
    expected = torch.autograd.grad(Wv, v, dW)[0]
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_conv_cell_operator_norm_is_at_most_gamma():
    torch.manual_seed(5)
    cell = ConvCell(2, gamma=0.8).double()
    # Dense matrix of the linear part z -> K * z on 2 x 5 x 5 inputs, built column by column.
    n = 2 * 5 * 5
    basis = torch.eye(n, dtype=f64).reshape(n, 2, 5, 5)
    cols = F.conv2d(basis, cell.kernel().detach(), padding=1).reshape(n, n)
    assert float(torch.linalg.matrix_norm(cols.T, ord=2)) <= 0.8 + 1e-12


def test_deq_conv_on_8x8_images_reaches_its_fixed_point():
    torch.manual_seed(6)
    model = DEQConv(64, 10, channels=4, atol=1e-10, max_iter=200).double()
    x = torch.randn(3, 64, dtype=f64)
    out = model(x)
    assert out.shape == (3, 10)
    u = model.inject(x)
    z = model.deq(u)
    assert float((model.cell(z, u) - z).detach().norm()) <= 1e-9
    with pytest.raises(ValueError, match="square images"):
        DEQConv(60, 10)


def test_registry_and_option_errors():
    assert {"deq_mlp", "deq_conv", "mlp"} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'vit'; valid: deq_conv, deq_mlp, deq_transformer, ignn, "
                                              "implicit_linear, mdeq, mlp, mondeq, mondeq_conv"):
        build_model("vit", 4, 2)
    with pytest.raises(ValueError, match="activation='gelu' is not valid; choose one of tanh, relu"):
        build_model("deq_mlp", 4, 2, activation="gelu")
    with pytest.raises(ValueError, match="gamma must lie in"):
        MLPCell(3, gamma=1.0)
    with pytest.raises(TypeError, match="model 'mlp'.*colour"):
        build_model("mlp", 4, 2, colour="red")


@pytest.mark.parametrize("make", [lambda: DEQMLP(6, 3, width=5), lambda: DEQConv(16, 3, channels=2)],
                         ids=["deq_mlp", "deq_conv"])
def test_state_dict_holds_each_cell_weight_once_and_old_layouts_load(make):
    torch.manual_seed(7)
    model = make()
    state = model.state_dict()
    # every tensor once: no two keys share storage, and the cell lives under deq.cell only
    ptrs = [t.data_ptr() for t in state.values()]
    assert len(ptrs) == len(set(ptrs)), sorted(state)
    assert not [k for k in state if k.startswith("cell.")]
    assert [k for k in state if k.startswith("deq.cell.")] == ["deq.cell." + k for k in model.cell.state_dict()]
    assert model.cell is model.deq.cell
    assert sum(p.numel() for p in model.parameters()) == sum(t.numel() for t in state.values())
    # A state dict of the earlier layout (the cell also registered as `cell.*`) loads into the new one,
    # and so does one that has only the old names.
    other = make()
    old = {**{"cell." + k: v.clone() for k, v in model.cell.state_dict().items()},
           **{k: v.clone() for k, v in state.items()}}
    other.load_state_dict(old)
    for k, v in state.items():
        assert torch.equal(other.state_dict()[k], v)
    only_old = {("cell." + k[len("deq.cell."):] if k.startswith("deq.cell.") else k): v.clone() for k, v in state.items()}
    third = make()
    third.load_state_dict(only_old)
    for k, v in state.items():
        assert torch.equal(third.state_dict()[k], v)


def test_model_option_errors_are_typed_and_name_the_option():
    from iterlayers.errors import OptionTypeError, ValidationError

    with pytest.raises(OptionTypeError, match="width must be an integer"):
        build_model("deq_mlp", 4, 2, width=2.5)
    with pytest.raises(ValidationError, match="width must be an integer >= 1"):
        MLPCell(0)
    with pytest.raises(OptionTypeError, match="gamma must be a number"):
        MLPCell(3, gamma="0.5")
    with pytest.raises(ValidationError, match="gamma must lie in"):
        ConvCell(2, gamma=float("nan"))
    with pytest.raises(ValidationError, match="kernel_size=4 is not valid"):
        ConvCell(2, kernel_size=4)
    with pytest.raises(ValidationError, match="square images"):
        DEQConv(60, 10)
    with pytest.raises(OptionTypeError, match="model 'deq_conv'.*colour"):
        build_model("deq_conv", 16, 2, colour="red")
    with pytest.raises(ValidationError, match="unknown model 3"):
        build_model(3, 4, 2)
