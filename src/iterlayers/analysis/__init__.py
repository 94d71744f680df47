"""Analysis toolkit: will an iterative layer converge, how fast, how stable and how sensitive is it?

Every function takes any cell ``f(z, x)`` (x may be None; batch = first dimension, samples independent), is
matrix-free (Jacobian-vector / vector-Jacobian products, power iteration, Lanczos, GMRES) and batched, and
has a ``method="dense"`` path that builds the Jacobians exactly for small problems.

- ``jacobian``                        dense per-sample Jacobian ``[B, n, n]``
- ``spectral_radius``, ``jacobian_norm`` (``||J||_2``) -> ``Estimate`` (value, iterations, converged, method)
- ``lipschitz_upper_bound``           product bound for feed-forward modules
- ``certify_contraction``             -> ``ContractionCertificate`` (contractive / not contractive / unknown)
- ``fit_linear_rate``, ``predict_iterations``, ``predicted_rate``
- ``input_sensitivity``, ``parameter_sensitivity``, ``condition_number``, ``unrolled_sensitivity``
- ``jacobian_frobenius_penalty``      Hutchinson estimate of ``||J||_F^2 / n`` for training
- ``report``                          -> ``AnalysisReport`` (table + PNG plots)
- ``audit_gradients``                 -> ``GradientAudit``: every gradient mode against finite differences
"""
from .audit import GradientAudit, audit_gradients
from .contraction import ContractionCertificate, certify_contraction
from .jacobian import jacobian
from .lipschitz import lipschitz_upper_bound
from .rates import fit_linear_rate, predict_iterations, predicted_rate
from .regularization import jacobian_frobenius_penalty
from .report import AnalysisReport, report
from .sensitivity import condition_number, input_sensitivity, parameter_sensitivity, unrolled_sensitivity
from .spectral import Estimate, jacobian_norm, spectral_radius

__all__ = [
    "jacobian",
    "Estimate",
    "spectral_radius",
    "jacobian_norm",
    "lipschitz_upper_bound",
    "ContractionCertificate",
    "certify_contraction",
    "fit_linear_rate",
    "predict_iterations",
    "predicted_rate",
    "input_sensitivity",
    "parameter_sensitivity",
    "condition_number",
    "unrolled_sensitivity",
    "jacobian_frobenius_penalty",
    "AnalysisReport",
    "report",
    "GradientAudit",
    "audit_gradients",
]
