"""iterlayers: deep networks whose layers are iterative algorithms.

Core API (see README.md):

- :func:`solve` — batched fixed-point solvers (Picard, Anderson, Broyden, GMRES) with per-sample stopping.
- :func:`deq_solve` — a differentiable fixed point with a choice of gradient mode.
- :class:`DEQ` — the equilibrium layer as an ``nn.Module``.
- :func:`audit_gradients` — which gradient mode to trust on your layer and batch (finite-difference reference).

Every error raised is an :class:`IterlayersError` (:mod:`iterlayers.errors`).
"""
from .implicit import (BACKWARD_MODES, DEQOptions, GradientMode, ImplicitGradient, JFBGradient, PhantomGradient,
                       ShineGradient, UnrolledGradient, deq_solve, implicit_backward)
from .unrolling import Unrolling, unroll
from . import analysis
from .analysis.audit import GradientAudit, audit_gradients
from .errors import (
    CheckpointError,
    IterlayersWarning,
    OptionTypeError,
    UnsupportedError,
    ValidationError,
)
from .cache import FixedPointCache
from .dropout import VariationalDropout
from .layers import DEQ, FixedPointCorrection, JacobianPenalty, SpectralMonitor, Unrolled
from .parametrizations import MonotoneLinear, SpectralNormLinear, spectral_norm, weight_norm
from .solvers import (
    SOLVERS,
    AndersonSolver,
    BroydenSolver,
    ConvergenceError,
    ConvergenceWarning,
    FixedPointSolver,
    GMRESSolver,
    IterlayersError,
    NonFiniteInputError,
    PicardSolver,
    ShapeMismatchError,
    Solution,
    SolverStats,
    make_solver,
    register_solver,
    solve,
)

__version__ = "0.1.0"

__all__ = [
    "solve",
    "unroll",
    "Unrolling",
    "Solution",
    "deq_solve",
    "DEQOptions",
    "GradientMode",
    "ImplicitGradient",
    "PhantomGradient",
    "JFBGradient",
    "UnrolledGradient",
    "ShineGradient",
    "implicit_backward",
    "DEQ",
    "analysis",
    "MonotoneLinear",
    "SpectralNormLinear",
    "spectral_norm",
    "weight_norm",
    "Unrolled",
    "FixedPointCorrection",
    "JacobianPenalty",
    "SpectralMonitor",
    "VariationalDropout",
    "FixedPointCache",
    "BACKWARD_MODES",
    "SOLVERS",
    "make_solver",
    "register_solver",
    "FixedPointSolver",
    "PicardSolver",
    "AndersonSolver",
    "BroydenSolver",
    "GMRESSolver",
    "SolverStats",
    "ConvergenceError",
    "ConvergenceWarning",
    "IterlayersError",
    "NonFiniteInputError",
    "ShapeMismatchError",
    "ValidationError",
    "OptionTypeError",
    "UnsupportedError",
    "CheckpointError",
    "IterlayersWarning",
    "audit_gradients",
    "GradientAudit",
]
