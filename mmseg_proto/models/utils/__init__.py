from .autograd_functions import (ChunkedPrototypeScores, FusedPrototypeScores,
                                 L2Normalize, l2_normalize)
from .prototype_bank import PrototypeBank
from .prototype_scorer import PrototypeScorer
from .prototype_similarity import (DISTANCES, buffer_index, prototype_matrix,
                                   similarity_column, similarity_from_cosine,
                                   similarity_slabs)
from .prototype_statistics import PrototypeBatch, PrototypeStatistics, prototype_health
from .sinkhorn import sinkhorn_knopp

__all__ = ['ChunkedPrototypeScores', 'FusedPrototypeScores', 'L2Normalize', 'l2_normalize',
           'PrototypeBank', 'PrototypeScorer', 'DISTANCES', 'buffer_index',
           'prototype_matrix', 'similarity_column', 'similarity_from_cosine',
           'similarity_slabs', 'PrototypeBatch', 'PrototypeStatistics', 'prototype_health',
           'sinkhorn_knopp']
