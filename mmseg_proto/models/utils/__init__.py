from .fused_prototype_scores import FusedPrototypeScores
from .l2_normalize import L2Normalize, l2_normalize
from .prototype_bank import PrototypeBank
from .prototype_scorer import PrototypeScorer
from .prototype_statistics import PrototypeStatistics
from .sinkhorn import sinkhorn_knopp

__all__ = ['FusedPrototypeScores', 'PrototypeBank', 'PrototypeScorer', 'PrototypeStatistics',
           'L2Normalize', 'l2_normalize', 'sinkhorn_knopp']
