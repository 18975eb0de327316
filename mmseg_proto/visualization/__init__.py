"""Helpers behind ``tools/visualization/vis_prototype_similarity.py`` and
``tools/visualization/vis_embedding.py``: model loading, pixel embeddings, prototype
similarity maps and 2-D projections (PCA, t-SNE)."""
from .prototypes import (class_indices, collect_embeddings, load_model,
                         pca_2d, preprocess_image, proto_head,
                         prototype_similarity, reduce_2d, tsne_2d)

__all__ = [
    'class_indices', 'collect_embeddings', 'load_model', 'pca_2d',
    'preprocess_image', 'proto_head', 'prototype_similarity', 'reduce_2d',
    'tsne_2d'
]
