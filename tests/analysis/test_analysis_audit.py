"""The gradient audit: exact modes are trusted, approximate ones flagged, a bad reference trusts nothing."""
import pytest
import torch
from torch import nn

import iterlayers as il
from iterlayers.analysis.audit import audit_gradients
from iterlayers.errors import OptionTypeError, ValidationError


class Cell(nn.Module):
    def __init__(self, d, gain):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        W = torch.randn(d, d, generator=g)
        self.W = nn.Parameter(gain * W / torch.linalg.matrix_norm(W, 2))
        self.U = nn.Parameter(torch.randn(d, d, generator=g) / d ** 0.5)

    def forward(self, z, x):
        return torch.tanh(z @ self.W.T + x @ self.U.T)


def _layer(gain=0.9, **kw):
    opts = dict(solver="anderson", atol=1e-10, rtol=0.0, max_iter=300, backward_atol=1e-10, backward_rtol=0.0,
                backward_max_iter=300, on_failure="ignore", phantom_steps=5)
    opts.update(kw)
    return il.DEQ(Cell(6, gain), **opts)


def test_exact_modes_trusted_and_jfb_flagged_on_a_slowly_contracting_cell():
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    layer = _layer(0.95)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    audit = audit_gradients(layer, x, n_directions=5)
    by = audit.by_mode()
    assert audit.reference_converged and audit.fd_noise < 1e-4
    assert by["implicit"].rel_error < 1e-4 and by["implicit"].trusted and by["implicit"].backward_converged
    assert by["unrolled"].rel_error < 1e-4 and by["unrolled"].trusted
    # JFB drops (I - J)^{-1}: on a cell with ||J|| near 0.95 its gradient is far from the true one.
    assert by["jfb"].rel_error > 0.05 and not by["jfb"].trusted
    # The recommendation is the cheapest trusted mode (phantom is trusted when its truncation error < 5%).
    trusted = [m for m in audit.modes if m.trusted]
    assert audit.recommended == min(trusted, key=lambda m: m.seconds).mode
    assert by["phantom"].trusted == (by["phantom"].rel_error <= 0.05)
    assert "implicit" in str(audit) and "| jfb |" in audit.table()
    # The user's layer is untouched (same dtype, same values).
    for k, v in layer.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k])


def test_reference_matches_the_dense_implicit_gradient():
    """The audit's reference is the derivative through the exact fixed point: check it against the dense IFT."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, dtype=torch.float64)
    layer = _layer(0.8).double()
    audit = audit_gradients(layer, x, modes=("implicit",), n_directions=4)
    assert audit.by_mode()["implicit"].rel_error < 1e-6
    # Dense: dL/dU = sum_i (I - J_i)^{-T} z_i  propagated through df/dU; compare one entry by autograd.
    cell = layer.cell
    with torch.no_grad():
        z = il.solve(lambda zz: cell(zz, x), torch.zeros_like(x), atol=1e-13, rtol=0.0, max_iter=500).z
    J = torch.stack([torch.autograd.functional.jacobian(lambda zz: cell(zz[None], x[i:i + 1])[0], z[i])
                     for i in range(3)])
    u = torch.linalg.solve((torch.eye(6, dtype=torch.float64) - J).transpose(1, 2), z.unsqueeze(2)).squeeze(2)
    zz = z.clone().requires_grad_(False)
    fz = cell(zz, x)
    (gU,) = torch.autograd.grad(fz, cell.U, u)
    layer.options = layer.options.replace(backward="implicit")
    out = layer(x)
    (gU_layer,) = torch.autograd.grad(0.5 * out.square().sum(), layer.cell.U)
    assert torch.allclose(gU_layer, gU, rtol=1e-7, atol=1e-9)


def test_unconverged_reference_trusts_nothing():
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(2))
    layer = _layer(3.0)  # far from a contraction: no tight fixed point within the budget
    audit = audit_gradients(layer, x, n_directions=2, reference_max_iter=20)
    assert not audit.reference_converged and audit.recommended is None
    assert not any(m.trusted for m in audit.modes) and audit.notes


def test_bad_arguments_are_typed_errors():
    x = torch.randn(2, 6)
    with pytest.raises(OptionTypeError):
        audit_gradients(nn.Linear(6, 6), x)
    with pytest.raises(ValidationError):
        audit_gradients(_layer(), x, modes=("exact",))
    with pytest.raises(OptionTypeError):
        audit_gradients(_layer(), x, n_directions=True)
