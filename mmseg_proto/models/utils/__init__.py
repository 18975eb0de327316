from .fused_prototype_scores import FusedPrototypeScores
from .l2_normalize import L2Normalize, l2_normalize
from .prototype_statistics import PrototypeStatistics
from .sinkhorn import sinkhorn_knopp

__all__ = ['FusedPrototypeScores', 'PrototypeStatistics', 'L2Normalize', 'l2_normalize', 'sinkhorn_knopp']
