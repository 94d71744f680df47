"""Algorithm ("reasoning") layers: unrolled optimisers over learned energies, their equilibrium mode,
learned-algorithm baselines, and closed-form theory for quadratics.

Chen, Zhang, Reisinger, Song, *Understanding Deep Architectures with Reasoning Layer*, NeurIPS 2020
(arXiv 2006.13401).
"""
from .energy import (AutogradBound, AutogradEnergy, BoundEnergy, BoxConstraint, Energy, L1Penalty,
                     NonnegativeConstraint, Quadratic, QuadraticEnergy, Regularizer, random_rotation,
                     spd_from_eigs)
from .unrolled import UnrolledAlgorithm, bind_energy
from .gd import GradientDescent
from .nesterov import Nesterov, nesterov_momentum
from .heavy_ball import HeavyBall, polyak_parameters
from .proximal import FISTA, ISTA
from .baselines import MLPRNN, GradientRNN
from . import theory

__all__ = [
    "AutogradBound", "AutogradEnergy", "BoundEnergy", "BoxConstraint", "Energy", "L1Penalty",
    "NonnegativeConstraint", "Quadratic", "QuadraticEnergy", "Regularizer", "random_rotation",
    "spd_from_eigs", "UnrolledAlgorithm", "bind_energy", "GradientDescent", "Nesterov",
    "nesterov_momentum", "HeavyBall", "polyak_parameters", "FISTA", "ISTA", "MLPRNN", "GradientRNN",
    "theory",
]
