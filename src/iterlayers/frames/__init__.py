"""Deep frame approximation and the deep frame potential (Murdock, Cazenavette & Lucey).

Sources: "Reframing Neural Networks: Deep Structure in Overcomplete Representations" (arXiv 2103.05804) and
"Dataless Model Selection with the Deep Frame Potential" (CVPR 2020, arXiv 2003.13866).
"""
from .architecture import KINDS, FrameArchitecture
from .conv import (
    PADDINGS,
    ConvFrameArchitecture,
    ConvFrameNet,
    conv_coherence_bound,
    conv_gram_potential,
    conv_mutual_coherence,
    conv_symbol,
)
from .deep_potential import (
    NORMALIZATIONS,
    DFPResult,
    deep_frame_potential,
    deep_frame_potential_lower_bound,
    global_frame_potential,
    minimize_deep_frame_potential,
)
from .global_frame import STRUCTURES, GlobalFrame, assemble_global_frame, conv_matrix
from .networks import DeepFrameNet
from .sparse_coding import (
    SPARSE_CODING_SOLVERS,
    apg,
    feed_forward,
    kkt_residual,
    lipschitz_constant,
    objective,
    objective_gradient,
    pad_input,
    prox_grad_step,
    solve_sparse_coding,
)
from .potential import (
    frame_potential,
    frame_potential_lower_bound,
    gram_matrix,
    mutual_coherence,
    normalize_columns,
    welch_bound,
)

__all__ = [
    "KINDS", "FrameArchitecture", "PADDINGS", "ConvFrameArchitecture", "ConvFrameNet", "conv_coherence_bound",
    "conv_gram_potential", "conv_mutual_coherence", "conv_symbol", "NORMALIZATIONS", "DFPResult", "deep_frame_potential",
    "deep_frame_potential_lower_bound", "global_frame_potential", "minimize_deep_frame_potential",
    "STRUCTURES", "GlobalFrame", "assemble_global_frame", "conv_matrix", "frame_potential",
    "frame_potential_lower_bound", "gram_matrix", "mutual_coherence", "normalize_columns", "welch_bound",
    "DeepFrameNet", "SPARSE_CODING_SOLVERS", "apg", "feed_forward", "kkt_residual", "lipschitz_constant", "objective",
    "objective_gradient", "pad_input", "prox_grad_step", "solve_sparse_coding",
]
