"""Networks as operators solved by iterative methods (Zappala et al., arXiv 2310.01618).

- ``PicardIteration`` / ``IterativeOperator`` / ``relaxed_picard``: relaxed Picard iteration of any T(z, x);
  ``check_convergence``: the contraction conditions, measured; ``make_schedule``: relaxation schedules.
- ``PIGN``: the Picard Iterative Graph Neural Network; ``GCN``, ``DeepGCN``: its baselines; ``mad``: MAD.
- ``PicardTransformer``: a Picard-iterated transformer block; ``IterativeDenoiser``: a denoiser iterated as an
  operator on 1-D signals.
- ``load_graph`` and friends: offline graphs (named substitutes for Cora/CiteSeer/PubMed);
  ``train_node_classifier``: the paper's training procedure for node classification.
"""
from .denoiser import DenoisingOperator, IterativeDenoiser
from .gcn import GCN, DeepGCN
from .graph_conv import GraphConv, edge_index_to_adjacency, normalized_adjacency, propagate
from .graph_data import (GRAPHS, GraphData, add_feature_noise, contextual_sbm, digits_knn, load_graph,
                         networkx_graph, row_normalize, stochastic_block_model)
from .metrics import cosine_distance_matrix, mad
from .picard import (GRADIENT_MODES, ConvergenceCheck, IterativeOperator, PicardIteration, PicardStats,
                     check_convergence, observed_rate, relaxed_picard)
from .pign import ALPHA_MODES, PIGN, PIGNOperator
from .schedules import SCHEDULES, make_schedule, validate_schedule
from .training import NodeResult, train_node_classifier
from .transformer import PicardTransformer, TransformerBlock, TransformerOperator

__all__ = [
    "PicardIteration", "IterativeOperator", "relaxed_picard", "PicardStats", "check_convergence",
    "ConvergenceCheck", "observed_rate", "GRADIENT_MODES", "make_schedule", "validate_schedule", "SCHEDULES",
    "PIGN", "PIGNOperator", "ALPHA_MODES", "GCN", "DeepGCN", "GraphConv", "normalized_adjacency", "propagate",
    "edge_index_to_adjacency", "mad", "cosine_distance_matrix", "PicardTransformer", "TransformerBlock",
    "TransformerOperator", "IterativeDenoiser", "DenoisingOperator", "GraphData", "load_graph", "GRAPHS",
    "add_feature_noise", "row_normalize", "contextual_sbm", "stochastic_block_model", "digits_knn",
    "networkx_graph", "train_node_classifier", "NodeResult",
]
