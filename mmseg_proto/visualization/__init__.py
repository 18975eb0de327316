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
# Case-based explanations (tools/analysis_tools/prototype_report.py, explain_pixel.py).
from .pixel_explanation import PixelExplanation, explain_pixel  # noqa: E402
from .prototype_gallery import (PrototypeGallery, build_gallery,  # noqa: E402
                                build_split_dataset, load_gallery, save_gallery)
from .prototype_report_page import write_report_html  # noqa: E402
from .top_n import TopN  # noqa: E402

__all__ += [
    'PixelExplanation', 'PrototypeGallery', 'TopN', 'build_gallery', 'build_split_dataset',
    'explain_pixel', 'load_gallery', 'save_gallery', 'write_report_html'
]
