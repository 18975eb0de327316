from .fused_prototype_scores import FusedPrototypeScores
from .sinkhorn import sinkhorn_knopp

__all__ = ['FusedPrototypeScores', 'sinkhorn_knopp']
