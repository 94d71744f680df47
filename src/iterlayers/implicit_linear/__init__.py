"""Kawaguchi's implicit (deep equilibrium) linear model and its convergence theory.

K. Kawaguchi, "On the Theory of Implicit Deep Learning: Global Convergence with Implicit Layers", ICLR 2021
(arXiv 2102.07346). :mod:`.model`: the model f(x) = B (I - gamma sigma(A))^{-1} phi(x), its losses and the
closed-form implicit gradient; :mod:`.theory`: the shallow model R phi(x) it represents, the quantities of the
linear-convergence bound (our derivation) and the trust-region-Newton relation (as we derived it). The
experiment is :mod:`iterlayers.experiments.implicit_linear` (``iterlayers reproduce implicit_linear``).
"""
from .model import (EQUILIBRIA, LOSSES, REDUCTIONS, EquilibriumCell, ImplicitLinearModel, column_softmax,
                    equilibrium_gradient, implicit_gradient, logistic_loss, loss_fn, loss_grad, square_moment_gradient,
                    square_moments, squared_loss)
from .theory import (ShallowLinearModel, ShallowOptimum, TheoremQuantities, induced_metric, lambda_U,
                     lambda_U_bounds, lambda_U_range, local_pl_constant, logistic_infimum_attained, min_nonzero_eig,
                     nearest_least_squares, pl_constant_square, rate_bounds, shallow_grad, shallow_hessian,
                     shallow_loss, shallow_optimum, theorem_quantities, trust_region_newton_step,
                     trust_region_subproblem)
from . import model, theory

__all__ = [
    # model
    "column_softmax", "EquilibriumCell", "ImplicitLinearModel", "squared_loss", "logistic_loss", "loss_fn",
    "loss_grad", "implicit_gradient", "equilibrium_gradient", "square_moments", "square_moment_gradient",
    "EQUILIBRIA", "LOSSES", "REDUCTIONS",
    # theory
    "ShallowLinearModel", "ShallowOptimum", "TheoremQuantities", "shallow_loss", "shallow_grad", "shallow_hessian",
    "shallow_optimum", "min_nonzero_eig", "pl_constant_square", "local_pl_constant", "lambda_U", "lambda_U_range",
    "lambda_U_bounds", "logistic_infimum_attained", "nearest_least_squares", "theorem_quantities", "rate_bounds",
    "induced_metric", "trust_region_subproblem", "trust_region_newton_step",
    "model", "theory",
]
