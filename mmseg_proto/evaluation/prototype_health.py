"""Prototype health: how many of a class's K prototypes its pixels actually use.

The training-time Sinkhorn assignment is balanced by construction (every prototype gets
N_c / K pixels), so it cannot show collapse. What matters at inference is the *nearest*
prototype of the pixel's own class (the max over K): these functions count, per class, how
its labelled pixels spread over its prototypes under that rule, and how similar the class's
prototypes are to each other.
"""
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from ..models.utils.prototype_index import buffer_index
from ..models.utils.prototype_scorer import PrototypeScorer


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


def prototype_health(prototypes: Tensor, usage: Tensor,
                     min_share: float = 0.01) -> Dict[str, Tensor]:
    """Per-class health figures.

    Args:
        prototypes (Tensor): (C, K, D) unit prototypes.
        usage (Tensor): (C, K) pixel counts (:func:`nearest_prototype_usage`).
        min_share (float): A prototype counts as used when it is the nearest one for at
            least this share of the class's pixels. Default: 0.01.

    Returns:
        dict[str, Tensor]: (C,) each: ``pixels``; ``effective``, the number of prototypes
        used (share >= ``min_share``); ``exp_entropy``, exp of the entropy of the usage
        shares (1: all pixels on one prototype, K: evenly spread); ``cos_min``,
        ``cos_mean``, ``cos_max`` of the pairwise cosines between the class's prototypes
        (NaN for K = 1). Classes without pixels have NaN usage figures.
    """
    usage = usage.double()
    pixels = usage.sum(dim=1)
    share = usage / pixels.clamp(min=1)[:, None]
    absent = pixels == 0
    nan = torch.tensor(float('nan'), dtype=torch.float64)
    entropy = -(share * torch.log(share.clamp(min=1e-300))).sum(dim=1)
    protos = torch.nn.functional.normalize(prototypes.double(), dim=-1)
    k = protos.shape[1]
    cos = protos @ protos.transpose(1, 2)  # (C, K, K)
    off = ~torch.eye(k, dtype=torch.bool)
    pairs = cos[:, off] if k > 1 else torch.full((cos.shape[0], 1), math.nan,
                                                  dtype=torch.float64)
    return dict(
        pixels=pixels,
        effective=torch.where(absent, nan, (share >= min_share).sum(dim=1).double()),
        exp_entropy=torch.where(absent, nan, entropy.exp()),
        cos_min=pairs.min(dim=1).values, cos_mean=pairs.mean(dim=1),
        cos_max=pairs.max(dim=1).values)


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
