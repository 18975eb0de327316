"""Prototype health: how many of a class's K prototypes its pixels actually use.

The training-time Sinkhorn assignment is balanced by construction (every prototype gets
N_c / K pixels), so it cannot show collapse. What matters at inference is the *nearest*
prototype of the pixel's own class (the max over K): these functions count, per class, how
its labelled pixels spread over its prototypes under that rule, and how similar the class's
prototypes are to each other. :func:`prototype_health` is defined with the bank's statistics
(:mod:`mmseg_proto.models.utils.prototype_statistics`), which log it during training.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..models.utils.prototype_similarity import buffer_index
from ..models.utils.prototype_scorer import PrototypeScorer
from ..models.utils.prototype_statistics import prototype_health

__all__ = ['format_health_table', 'nearest_prototype_usage', 'prototype_health']


def nearest_prototype_usage(embeddings: Tensor, labels: Tensor, prototypes: Tensor,
                            ignore_index: int = 255, chunk: int = 65536) -> Tensor:
    """(C, K) counts: for each labelled pixel, its class's prototype nearest to it.

    Args:
        embeddings (Tensor): (N, D) unit pixel embeddings.
        labels (Tensor): (N,) class of each pixel; ``ignore_index`` is skipped.
        prototypes (Tensor): (C, K, D) the ``prototypes`` buffer.
        ignore_index (int): Label to skip. Default: 255.
        chunk (int): Pixels per block of similarities. Default: 65536.
    """
    c, k, _ = prototypes.shape
    keep = labels != ignore_index
    emb, lab = embeddings[keep].to(prototypes.dtype), labels[keep]
    nearest = []
    for start in range(0, len(lab), chunk):  # (chunk, C, K) similarities at a time
        part = slice(start, start + chunk)
        sims = PrototypeScorer.cosines(emb[part], prototypes)
        own = sims[torch.arange(sims.shape[0]), lab[part]]  # (chunk, K)
        nearest.append(own.argmax(dim=1))
    index = buffer_index(lab, torch.cat(nearest) if nearest else lab, k)
    return torch.bincount(index, minlength=c * k).view(c, k)


def format_health_table(health: Dict[str, Tensor],
                        class_names: Optional[Sequence[str]] = None) -> str:
    """A Markdown table, one row per class, then the mean over classes with pixels."""
    c = health['pixels'].numel()
    names = list(class_names) if class_names else [str(i) for i in range(c)]
    rows: List[str] = [
        '| class | pixels | effective prototypes (>= 1%) | exp-entropy of use | '
        'cosine min / mean / max |', '|---|---|---|---|---|']
    for i in range(c):
        h = {key: float(value[i]) for key, value in health.items()}
        rows.append(f"| {names[i]} | {int(h['pixels'])} | {h['effective']:.0f} | "
                    f"{h['exp_entropy']:.2f} | {h['cos_min']:.2f} / {h['cos_mean']:.2f} / "
                    f"{h['cos_max']:.2f} |")
    present = health['pixels'] > 0
    mean = {key: float(value[present].mean()) for key, value in health.items()}
    rows.append(f"| **mean over {int(present.sum())} classes** | {int(mean['pixels'])} | "
                f"{mean['effective']:.1f} | {mean['exp_entropy']:.2f} | "
                f"{mean['cos_min']:.2f} / {mean['cos_mean']:.2f} / {mean['cos_max']:.2f} |")
    return '\n'.join(rows)
