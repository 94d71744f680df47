"""report(): the table's numbers agree with the individual analyses, and the PNG figures are written."""
import torch

import iterlayers as il
from iterlayers.analysis import AnalysisReport, report, spectral_radius
from iterlayers.parametrizations import SpectralNormLinear

D = torch.float64


def _cell(seed=0):
    torch.manual_seed(seed)
    return SpectralNormLinear(6, in_features=3, bound=0.8).double()


def test_report_on_a_cell_prints_and_plots(tmp_path):
    cell = _cell()
    x = torch.randn(5, 3, dtype=D)
    rep = report(cell, x, atol=1e-10)
    assert isinstance(rep, AnalysisReport) and rep.batch == 5 and rep.n == 6 and rep.method == "dense"
    assert rep.certificate.verdict == "contractive"
    assert float(rep.fixed_point_residual.max()) <= 1e-10
    assert bool((rep.spectral_norm <= 0.8 + 1e-9).all()) and bool((rep.spectral_radius <= rep.spectral_norm + 1e-12).all())
    # Picard on this contraction: predicted iterations close to measured, fitted rate close to rho(J*)
    ratio = rep.predicted_iterations.double() / rep.measured_iterations.double()
    assert bool(((ratio > 1 / 1.5) & (ratio < 1.5)).all())
    assert rep.trace_solver == "picard" and rep.input_sensitivity.shape == (5,)
    assert rep.parameter_sensitivity.shape == (5,) and bool((rep.parameter_sensitivity > 0).all())
    assert rep.eigenvalues.shape == (5, 6)
    text = str(rep)
    for row in ("spectral radius", "spectral norm", "condition number", "input sensitivity", "fitted rate",
                "predicted iterations", "contraction verdict : contractive"):
        assert row in text
    paths = [rep.plot(tmp_path / "all.png"), rep.plot_residuals(tmp_path / "res.png"),
             rep.plot_spectrum(tmp_path / "spec.png"), rep.plot_sensitivity(tmp_path / "sub" / "sens.png")]
    for p in paths:
        assert p.exists() and p.stat().st_size > 1000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(rep.summary()) >= {"verdict", "spectral radius rho(J*)"}


def test_report_on_a_deq_uses_its_cell_and_trace(tmp_path):
    cell = _cell(1)
    layer = il.DEQ(cell, solver="anderson", atol=1e-9, rtol=0.0, max_iter=200, return_trace=True)
    x = torch.randn(12, 3, dtype=D)
    rep = report(layer, x, max_samples=8)
    assert rep.batch == 8 and rep.trace_solver == "anderson"
    z = layer(x[:8]).detach()
    torch.testing.assert_close(rep.spectral_radius, spectral_radius(cell, z, x[:8], method="dense").value,
                               rtol=1e-6, atol=1e-9)
    assert rep.trace.shape[1] == 8
    assert "anderson trace" in str(rep)
    assert rep.plot(tmp_path / "deq.png").stat().st_size > 1000


def test_report_on_a_plain_function_without_parameters():
    W = torch.tensor([[0.5, 0.2], [-0.1, 0.3]], dtype=D)
    rep = report(lambda z, x: z @ W.T + x, torch.ones(3, 2, dtype=D), sensitivities=True)
    assert rep.parameter_sensitivity is None
    torch.testing.assert_close(rep.spectral_radius, torch.linalg.eigvals(W).abs().max().expand(3))
    eye = torch.eye(2, dtype=D)
    torch.testing.assert_close(rep.input_sensitivity, torch.linalg.matrix_norm(torch.linalg.inv(eye - W), 2).expand(3))
    assert "n/a" in str(rep)  # the parameter sensitivity row


def test_report_on_a_deq_without_trace_computes_a_picard_trace():
    cell = _cell(2)
    layer = il.DEQ(cell, solver="anderson", atol=1e-9, rtol=0.0, max_iter=200)
    rep = report(layer, torch.randn(3, 3, dtype=D), sensitivities=False)
    assert rep.trace_solver == "picard" and rep.trace.shape[1] == 3
    assert rep.input_sensitivity is None
    torch.testing.assert_close(rep.fitted_rate, rep.predicted_rate, rtol=0.25, atol=0)


def test_report_on_a_divergent_cell_says_not_contractive_and_predicts_nothing():
    W = torch.diag(torch.tensor([1.2, 0.5, -0.3], dtype=D))
    rep = report(lambda z, x: z @ W.T + x, torch.ones(2, 3, dtype=D), max_iter=50, sensitivities=False)
    assert rep.certificate.verdict == "not contractive"
    torch.testing.assert_close(rep.spectral_radius, torch.full((2,), 1.2, dtype=D))
    assert bool(rep.predicted_iterations.isnan().all())
    assert float(rep.fixed_point_residual.min()) > 1e-3  # Picard found no fixed point
    assert "not contractive" in str(rep)
