from .fused_prototype_scores import FusedPrototypeScores
from .l2_normalize import L2Normalize, l2_normalize
from .sinkhorn import sinkhorn_knopp

__all__ = ['FusedPrototypeScores', 'L2Normalize', 'l2_normalize', 'sinkhorn_knopp']
