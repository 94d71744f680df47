"""Networks as operators solved by iterative methods (Zappala et al., arXiv 2310.01618).

- ``PicardIteration`` / ``IterativeOperator`` / ``relaxed_picard``: relaxed Picard iteration of any T(z, x);
  ``check_convergence``: the contraction conditions, measured; ``make_schedule``: relaxation schedules.
- ``PIGN``: the Picard Iterative Graph Neural Network on PyTorch Geometric (``conv="gat"``: the iterative GAT);
  ``GCN`` (plain N-layer), ``GAT``: its baselines; ``output_mad``: over-smoothing (MAD of softmax outputs).
- ``PicardTransformer``: a Picard-iterated transformer block (``PatchTransformer``: on 2-D fields, patches as
  tokens; ``form="injected"``: the variant that can contract); ``IterativeDenoiser``: a denoiser iterated as an
  operator on 1-D signals; ``VorticitySolver`` / ``navier_stokes_pairs``: the offline 2-D Navier-Stokes task.
- ``load_graph`` / ``planetoid_like`` and friends: offline graphs (named substitutes for Cora/CiteSeer),
  ``GraphData.to_pyg``; ``train_node_classifier`` / ``random_search`` / ``evaluate``: the co-author protocol.
"""
from .denoiser import DenoisingOperator, IterativeDenoiser
from .gcn import GAT, GCN
from .graph_conv import check_edge_index, edge_index_to_adjacency, gcn_adjacency, gcn_edges, normalized_adjacency
from .graph_data import (GRAPHS, PLANETOID_SHAPES, GraphData, add_feature_noise, contextual_sbm, digits_knn,
                         load_graph, networkx_graph, planetoid_like, row_normalize, stochastic_block_model)
from .metrics import cosine_distance_matrix, mad, output_mad
from .picard import (ConvergenceCheck, IterativeOperator, PicardIteration, check_convergence, relative_steps,
                     relaxed_picard)
from .pign import ALPHA_MODES, CONVS, PIGN, GATOperator, PIGNOperator, SpectralCap
from .schedules import SCHEDULES, make_schedule, validate_schedule
from .training import NodeResult, SearchSpace, evaluate, random_search, train_node_classifier
from .transformer import FORMS, PatchTransformer, PicardTransformer, TransformerBlock, TransformerOperator
from .navier_stokes import VorticitySolver, navier_stokes_pairs

__all__ = [
    "PicardIteration", "IterativeOperator", "relaxed_picard", "relative_steps", "check_convergence",
    "ConvergenceCheck", "make_schedule", "validate_schedule", "SCHEDULES",
    "PIGN", "PIGNOperator", "GATOperator", "SpectralCap", "ALPHA_MODES", "CONVS", "GCN", "GAT", "gcn_edges", "gcn_adjacency",
    "normalized_adjacency", "edge_index_to_adjacency", "check_edge_index", "mad", "output_mad",
    "cosine_distance_matrix", "PicardTransformer", "PatchTransformer", "FORMS", "VorticitySolver",
    "navier_stokes_pairs", "TransformerBlock", "TransformerOperator", "IterativeDenoiser",
    "DenoisingOperator", "GraphData", "load_graph", "GRAPHS", "planetoid_like", "PLANETOID_SHAPES",
    "add_feature_noise", "row_normalize", "contextual_sbm", "stochastic_block_model", "digits_knn",
    "networkx_graph", "train_node_classifier", "random_search", "SearchSpace", "evaluate", "NodeResult",
]
