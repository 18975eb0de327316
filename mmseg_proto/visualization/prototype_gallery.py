"""Case-based explanations: the training pixels each prototype stands for.

A *prototype gallery* is one inference pass over a labelled split. Every labelled pixel of
class ``c`` is filed under the prototype of ``c`` nearest to it (the max over the class's K
prototypes, the rule of inference and of ``tools/analysis_tools/prototype_health.py``); per
prototype the gallery keeps its use count, the sum of the filed pixels' cosines and the N
filed pixels most similar to it, in a bounded top-N structure (:class:`TopN`, a fixed
(C*K, N) tensor merged image by image: no feature maps and no growing lists are kept).

Pixels are those of the decoder's feature grid (one embedding each); a cell's label is the
nearest-resized label map (as in :func:`~.prototypes.collect_embeddings`) and its position
is the original-image pixel whose label it took. Images go through the config's *test*
pipeline (resize, no random augmentation), whichever split they come from.

:func:`save_gallery` writes ``gallery.json`` and a crop around every kept pixel;
:func:`write_report_html` the static page of ``tools/analysis_tools/prototype_report.py``;
:func:`explain_pixel` explains one pixel of a new image by the gallery ("this looks like
that"), used by ``tools/analysis_tools/explain_pixel.py``.
"""
import copy
import hashlib
import html
import json
import math
import os
import os.path as osp
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.prototype_health import prototype_health
from ..models.utils.prototype_scorer import PrototypeScorer
from .prototypes import (ImageType, _valid_grid, pixel_features, preprocess_image,
                         proto_head, prototype_similarity)

GALLERY_FORMAT = 'mmseg_proto prototype gallery'
GALLERY_VERSION = 1
GALLERY_FILE = 'gallery.json'
REPORT_FILE = 'index.html'
CROP_DIR = 'crops'
#: Columns of the items kept per gallery pixel.
ITEM_FIELDS = ('image', 'y', 'x', 'grid_y', 'grid_x')


class TopN:
    """The N highest-scoring items of every slot, in fixed (slots, N) tensors.

    :meth:`push` merges a batch of candidates: each slot's candidates are ranked, the best
    N are merged with the kept N, and the best N of the 2N stay. Memory never exceeds
    (slots, 2N) whatever is offered. Ties keep the earlier candidate (stable sorts).

    Args:
        num_slots (int): Number of slots (here C*K prototypes, row ``c * K + k``).
        n (int): Items kept per slot, >= 1.
        width (int): Integers stored per item. Default: 1.
    """

    def __init__(self, num_slots: int, n: int, width: int = 1) -> None:
        if n < 1:
            raise ValueError(f'TopN keeps n >= 1 items per slot, got n={n}')
        self.n = n
        self.scores = torch.full((num_slots, n), -math.inf, dtype=torch.float32)
        self.items = torch.full((num_slots, n, width), -1, dtype=torch.long)

    def push(self, slots: Tensor, scores: Tensor, items: Tensor,
             limit: Optional[int] = None) -> None:
        """Offer M candidates.

        Args:
            slots (Tensor): (M,) slot of each candidate.
            scores (Tensor): (M,) its score (finite).
            items (Tensor): (M, width) its integers.
            limit (int, optional): Take at most this many of a slot's candidates of this
                push (its best ones), e.g. pixels of one image. Default: N.
        """
        if slots.numel() == 0:
            return
        num_slots, n = self.scores.shape
        if limit is not None:
            if limit < 1:
                raise ValueError(f'limit must be >= 1 or None, got {limit}')
            n_new = min(n, limit)
        else:
            n_new = n
        slots, scores = slots.long().cpu(), scores.float().cpu()
        items = items.long().cpu()
        # Candidates grouped by slot, best first within a slot (stable: input order on ties).
        order = torch.sort(scores, descending=True, stable=True).indices
        order = order[torch.sort(slots[order], stable=True).indices]
        grouped = slots[order]
        counts = torch.bincount(grouped, minlength=num_slots)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order)) - starts[grouped]
        keep = rank < n_new
        new_scores = torch.full_like(self.scores, -math.inf)
        new_items = torch.full_like(self.items, -1)
        new_scores[grouped[keep], rank[keep]] = scores[order][keep]
        new_items[grouped[keep], rank[keep]] = items[order][keep]
        # Kept items first, so that on equal scores the earlier one stays.
        all_scores = torch.cat([self.scores, new_scores], dim=1)
        all_items = torch.cat([self.items, new_items], dim=1)
        best = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :n]
        self.scores = torch.gather(all_scores, 1, best)
        self.items = torch.gather(all_items, 1, best[..., None].expand(-1, -1,
                                                                        all_items.shape[2]))

    def counts(self) -> Tensor:
        """(slots,) number of items kept per slot (<= N)."""
        return torch.isfinite(self.scores).sum(dim=1)

    def entries(self, slot: int) -> List[Tuple[float, List[int]]]:
        """(score, items) of one slot, best first."""
        return [(float(self.scores[slot, j]), self.items[slot, j].tolist())
                for j in range(int(self.counts()[slot]))]


@dataclass
class PrototypeGallery:
    """What one pass over a split found out about every prototype.

    Attributes:
        classes (list[str]): Class names.
        palette (list[list[int]]): RGB colour per class.
        prototypes (Tensor): (C, K, D) the head's prototypes.
        counts (Tensor): (C, K) labelled pixels filed under each prototype.
        similarity_sums (Tensor): (C, K) sum of their cosines to it (float64).
        top (TopN): C*K slots (row ``c * K + k``), items :data:`ITEM_FIELDS`.
        images (list[dict]): ``path``, ``height``, ``width`` (original size) per image.
        per_image (int): At most this many kept pixels per image and prototype (0: any).
    """
    classes: List[str]
    palette: List[List[int]]
    prototypes: Tensor
    counts: Tensor
    similarity_sums: Tensor
    top: TopN
    images: List[Dict[str, Any]] = field(default_factory=list)
    per_image: int = 0

    @property
    def num_classes(self) -> int:
        return int(self.prototypes.shape[0])

    @property
    def num_prototypes(self) -> int:
        return int(self.prototypes.shape[1])

    @property
    def per_prototype(self) -> int:
        return self.top.n

    def class_pixels(self) -> Tensor:
        """(C,) labelled pixels per class."""
        return self.counts.sum(dim=1)

    def use_share(self) -> Tensor:
        """(C, K) share of its class's pixels filed under each prototype (0 if none)."""
        return self.counts.double() / self.class_pixels().clamp(min=1).double()[:, None]

    def mean_similarity(self) -> Tensor:
        """(C, K) mean cosine of the pixels filed under each prototype (NaN if none)."""
        mean = self.similarity_sums / self.counts.clamp(min=1).double()
        return torch.where(self.counts > 0, mean, torch.full_like(mean, math.nan))

    def entries(self, c: int, k: int) -> List[Dict[str, Any]]:
        """The kept pixels of prototype ``k`` of class ``c``, most similar first."""
        out = []
        for score, item in self.top.entries(c * self.num_prototypes + k):
            entry = dict(zip(ITEM_FIELDS, item))
            entry['similarity'] = score
            out.append(entry)
        return out


def prototype_fingerprint(prototypes: Tensor) -> str:
    """A short hash of the prototypes, to tell a gallery's model from another."""
    data = prototypes.detach().to('cpu', torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha1(data).hexdigest()[:16]


def near_duplicates(prototypes: Tensor, threshold: float
                    ) -> List[Tuple[int, int, int, int, float]]:
    """Pairs of prototypes (of any classes) whose cosine is above ``threshold``.

    Args:
        prototypes (Tensor): (C, K, D) prototypes.
        threshold (float): Cosine above which two prototypes are near-duplicates.

    Returns:
        list[tuple]: ``(c1, k1, c2, k2, cosine)`` with ``(c1, k1)`` before ``(c2, k2)``.
    """
    c, k, d = prototypes.shape
    flat = F.normalize(prototypes.detach().double().reshape(c * k, d), dim=1)
    cos = flat @ flat.T
    i, j = torch.nonzero(torch.triu(cos > threshold, diagonal=1), as_tuple=True)
    return [(int(a) // k, int(a) % k, int(b) // k, int(b) % k, float(cos[a, b]))
            for a, b in zip(i.tolist(), j.tolist())]


def _test_pipeline_with_labels(cfg) -> List[Dict]:
    pipeline = cfg.get('test_pipeline')
    if pipeline is None:
        loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        pipeline = loader['dataset'].get('pipeline') if loader else None
    if not pipeline:
        raise ValueError('The config has no test_pipeline (nor a test_dataloader.dataset.'
                         'pipeline): the gallery loads every split with it')
    if not any(t['type'] == 'LoadAnnotations' for t in pipeline):
        raise ValueError("The config's test pipeline has no LoadAnnotations: the gallery "
                         "needs each pixel's label; add dict(type='LoadAnnotations') to it")
    return copy.deepcopy(list(pipeline))


def _set_pipeline(ds_cfg: Dict, pipeline: List[Dict]) -> None:
    if 'dataset' in ds_cfg:  # RepeatDataset and other wrappers
        _set_pipeline(ds_cfg['dataset'], pipeline)
    elif 'datasets' in ds_cfg:  # ConcatDataset
        for sub in ds_cfg['datasets']:
            _set_pipeline(sub, pipeline)
    else:
        ds_cfg['pipeline'] = copy.deepcopy(pipeline)


def build_split_dataset(cfg, split: str = 'train'):
    """The dataset of ``cfg.<split>_dataloader`` with the config's test pipeline.

    The test pipeline (resize, no random crop, flip or colour jitter) replaces the split's
    own, so that the train split is seen as at inference.

    Args:
        cfg (Config): A config (e.g. ``model.cfg``).
        split (str): 'train', 'val' or 'test'. Default: 'train'.

    Raises:
        ValueError: if the config has no such dataloader, or its test pipeline loads no
            annotations.
    """
    from mmseg.registry import DATASETS
    loader = cfg.get(f'{split}_dataloader')
    if not loader:
        raise ValueError(f'The config has no {split}_dataloader; choose another split '
                         '(train, val, test)')
    ds_cfg = copy.deepcopy(loader['dataset'])
    _set_pipeline(ds_cfg, _test_pipeline_with_labels(cfg))
    return DATASETS.build(ds_cfg)


def _source_indices(size_in: int, size_out: int) -> Tensor:
    """Index along one axis that ``F.interpolate(mode='nearest')`` reads for each output."""
    coords = torch.arange(size_in, dtype=torch.float32).view(1, 1, size_in, 1)
    return F.interpolate(coords, size=(size_out, 1), mode='nearest').view(-1).long()


@torch.no_grad()
def build_gallery(model: nn.Module, dataset, per_prototype: int = 8,
                  num_images: Optional[int] = None, per_image: int = 0,
                  progress: bool = False) -> PrototypeGallery:
    """One pass over ``dataset``: use, mean cosine and top-N pixels of every prototype.

    Args:
        model (nn.Module): ProtoSeg segmentor from :func:`~.prototypes.load_model`.
        dataset: Labelled MMSeg dataset (e.g. :func:`build_split_dataset`).
        per_prototype (int): Pixels N kept per prototype, >= 1. Default: 8.
        num_images (int, optional): Use the first ``num_images`` items (default: all).
        per_image (int): Keep at most this many pixels of one image per prototype (its
            most similar ones), for a more varied gallery; 0: no limit, the N most similar
            pixels of the split whichever images they are in. Default: 0.
        progress (bool): Show a progress bar (mmengine's). Default: False.

    Returns:
        PrototypeGallery: everything on CPU.
    """
    head = proto_head(model)
    if per_prototype < 1:
        raise ValueError(f'per_prototype must be >= 1, got {per_prototype}')
    if per_image < 0:
        raise ValueError(f'per_image must be >= 0 (0: no limit), got {per_image}')
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    if n < 1:
        raise ValueError('No images to build the gallery from: the dataset is empty '
                         '(check its data_root) or num_images < 1')
    protos = head.prototypes.detach()
    c, k, d = protos.shape
    counts = torch.zeros(c * k, dtype=torch.long)
    sums = torch.zeros(c * k, dtype=torch.float64)
    top = TopN(c * k, per_prototype, width=len(ITEM_FIELDS))
    images: List[Dict[str, Any]] = []
    bar = None
    if progress:
        from mmengine.utils import ProgressBar
        bar = ProgressBar(n)
    for i in range(n):
        item = dataset[i]
        sample = item['data_samples']
        if 'gt_sem_seg' not in sample:
            raise ValueError('The dataset pipeline loads no annotations (LoadAnnotations); '
                             'labels are needed to file each pixel under its class')
        data = model.data_preprocessor(dict(inputs=[item['inputs']], data_samples=[sample]),
                                       False)
        inputs = data['inputs']
        emb = pixel_features(model, inputs, 'proto')[0]  # (h, w, D)
        fh, fw = _valid_grid(emb.shape[:2], inputs.shape[-2:],
                             data['data_samples'][0].img_shape[:2])
        emb = emb[:fh, :fw]
        gt = sample.gt_sem_seg.data[0].cpu()  # (Hl, Wl)
        ys, xs = _source_indices(gt.shape[0], fh), _source_indices(gt.shape[1], fw)
        labels = gt[ys][:, xs].long().to(emb.device)
        oh, ow = sample.ori_shape[:2]
        # Original-image pixel of each label cell (the label map may be resized).
        oy = ((ys.double() + 0.5) * oh / gt.shape[0]).long().clamp(max=oh - 1)
        ox = ((xs.double() + 0.5) * ow / gt.shape[1]).long().clamp(max=ow - 1)
        images.append(dict(path=sample.img_path if 'img_path' in sample else None,
                           height=int(oh), width=int(ow)))
        valid = (labels >= 0) & (labels < c)
        gy, gx = torch.nonzero(valid, as_tuple=True)
        lab = labels[valid]
        if lab.numel():
            own = PrototypeScorer.cosines(emb[valid], protos)  # (M, C, K)
            own = own[torch.arange(lab.numel(), device=own.device), lab]  # (M, K)
            best, nearest = own.max(dim=1)
            slot = (lab * k + nearest).cpu()
            best = best.float().cpu()
            counts += torch.bincount(slot, minlength=c * k)
            sums.index_add_(0, slot, best.double())
            gy, gx = gy.cpu(), gx.cpu()
            top.push(slot, best, torch.stack(
                [torch.full_like(gy, i), oy[gy], ox[gx], gy, gx], dim=1),
                limit=per_image or None)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.file.write('\n')
    meta = getattr(model, 'dataset_meta', None) or {}
    classes = list(meta.get('classes') or [str(j) for j in range(c)])
    palette = [list(map(int, p)) for p in (meta.get('palette') or [[128, 128, 128]] * c)]
    return PrototypeGallery(classes=classes, palette=palette, prototypes=protos.float().cpu(),
                            counts=counts.view(c, k), similarity_sums=sums.view(c, k), top=top,
                            images=images, per_image=per_image)


def draw_marker(canvas: np.ndarray, y: int, x: int, radius: int = 3) -> np.ndarray:
    """Mark pixel (y, x) of an RGB image in place: a yellow square in a black one."""
    h, w = canvas.shape[:2]
    for r, colour in ((radius + 1, (0, 0, 0)), (radius, (255, 255, 0))):
        y0, y1, x0, x1 = y - r, y + r, x - r, x + r
        for yy in (y0, y1):
            if 0 <= yy < h:
                canvas[yy, max(x0, 0):min(x1, w - 1) + 1] = colour
        for xx in (x0, x1):
            if 0 <= xx < w:
                canvas[max(y0, 0):min(y1, h - 1) + 1, xx] = colour
    return canvas


def crop_around(image: np.ndarray, y: int, x: int, size: int = 64,
                mark: bool = True) -> np.ndarray:
    """A ``size`` x ``size`` crop of an RGB image centred on (y, x), grey outside it.

    The pixel lands at (size // 2, size // 2), marked when ``mark``.
    """
    h, w = image.shape[:2]
    half = size // 2
    out = np.full((size, size, 3), 128, dtype=np.uint8)
    y0, x0 = y - half, x - half
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + size, h), min(x0 + size, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1, :3]
    return draw_marker(out, half, half) if mark else out


def _write_png(path: str, rgb: np.ndarray) -> None:
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, optimize=True)


def _read_rgb(path: str) -> np.ndarray:
    import mmcv
    img = mmcv.imread(path, channel_order='rgb')
    if img is None:
        raise FileNotFoundError(f'Cannot read image {path}')
    return img


def _finite(value: float, digits: int = 6) -> Optional[float]:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def save_gallery(gallery: PrototypeGallery, out_dir: str, crop_size: int = 64,
                 duplicate_cosine: float = 0.95,
                 meta: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Write ``out_dir/gallery.json`` and ``out_dir/crops/*.png``; return the JSON dict.

    The returned dict also has ``root``, the absolute ``out_dir``, as from
    :func:`load_gallery` (crop paths are relative to it).

    Crops (``crop_size`` square around the pixel, marked) are written for the kept top-N
    only; each image is read once. An existing ``crops/`` folder is replaced.

    Args:
        gallery (PrototypeGallery): From :func:`build_gallery`.
        out_dir (str): Folder (created).
        crop_size (int): Crop side in original-image pixels. Default: 64.
        duplicate_cosine (float): Flag pairs of prototypes above this cosine. Default: 0.95.
        meta (dict, optional): Extra top-level fields (config, checkpoint, split, seconds).
    """
    c, k = gallery.num_classes, gallery.num_prototypes
    crop_dir = osp.join(out_dir, CROP_DIR)
    if osp.isdir(crop_dir):
        shutil.rmtree(crop_dir)
    os.makedirs(crop_dir)
    entries = {(ci, ki): gallery.entries(ci, ki) for ci in range(c) for ki in range(k)}
    by_image: Dict[int, List[Tuple[Dict[str, Any], str]]] = {}
    for (ci, ki), rows in entries.items():
        for rank, entry in enumerate(rows):
            entry['crop'] = f'{CROP_DIR}/c{ci:03d}_k{ki:03d}_{rank:03d}.png'
            by_image.setdefault(entry['image'], []).append(entry)
    for index, rows in sorted(by_image.items()):
        image = _read_rgb(gallery.images[index]['path'])
        for entry in rows:
            _write_png(osp.join(out_dir, entry['crop']),
                       crop_around(image, entry['y'], entry['x'], crop_size))
    dups: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}
    for c1, k1, c2, k2, cos in near_duplicates(gallery.prototypes, duplicate_cosine):
        dups.setdefault((c1, k1), []).append(dict(
            **{'class': c2}, class_name=gallery.classes[c2], prototype=k2,
            cosine=round(cos, 6)))
        dups.setdefault((c2, k2), []).append(dict(
            **{'class': c1}, class_name=gallery.classes[c1], prototype=k1,
            cosine=round(cos, 6)))
    share, mean = gallery.use_share(), gallery.mean_similarity()
    health = prototype_health(gallery.prototypes, gallery.counts)
    prototypes = []
    for ci in range(c):
        for ki in range(k):
            rows = entries[(ci, ki)]
            prototypes.append({
                'class': ci, 'class_name': gallery.classes[ci], 'prototype': ki,
                'pixels': int(gallery.counts[ci, ki]),
                'use_share': _finite(float(share[ci, ki])),
                'mean_similarity': _finite(float(mean[ci, ki])),
                'dead': bool(gallery.counts[ci, ki] == 0),
                'duplicates': sorted(dups.get((ci, ki), []),
                                     key=lambda d: (-d['cosine'], d['class'], d['prototype'])),
                'top': [dict(image=e['image'], y=e['y'], x=e['x'],
                             grid=[e['grid_y'], e['grid_x']],
                             similarity=round(e['similarity'], 6), crop=e['crop'])
                        for e in rows]})
    out: Dict[str, Any] = dict(format=GALLERY_FORMAT, version=GALLERY_VERSION)
    out.update(meta or {})
    out.update(
        num_images=len(gallery.images), per_prototype=gallery.per_prototype,
        per_image=gallery.per_image,
        crop_size=crop_size, duplicate_cosine=duplicate_cosine,
        num_classes=c, num_prototypes=k, embed_dims=int(gallery.prototypes.shape[2]),
        prototype_fingerprint=prototype_fingerprint(gallery.prototypes),
        classes=gallery.classes, palette=gallery.palette,
        class_pixels=[int(p) for p in gallery.class_pixels()],
        health={key: [_finite(float(v)) for v in value] for key, value in health.items()},
        images=gallery.images, prototypes=prototypes)
    with open(osp.join(out_dir, GALLERY_FILE), 'w') as f:
        json.dump(out, f, indent=1)
    out['root'] = osp.abspath(out_dir)  # as load_gallery gives it; not in the file
    return out


def load_gallery(path: str) -> Dict[str, Any]:
    """Read a ``gallery.json``; adds ``root``, its folder (crop paths are relative to it).

    Raises:
        ValueError: if the file is not a gallery written by :func:`save_gallery`.
    """
    if osp.isdir(path):
        path = osp.join(path, GALLERY_FILE)
    if not osp.isfile(path):
        raise FileNotFoundError(f'No gallery file {path}: write one with '
                                'tools/analysis_tools/prototype_report.py CONFIG CHECKPOINT '
                                '--out DIR (it writes DIR/gallery.json)')
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f'{path} is not JSON: {err}') from None
    if not isinstance(data, dict) or data.get('format') != GALLERY_FORMAT:
        raise ValueError(f'{path} is not a prototype gallery (written by '
                         'tools/analysis_tools/prototype_report.py)')
    data['root'] = osp.dirname(osp.abspath(path))
    return data


def prototype_record(gallery: Dict[str, Any], c: int, k: int) -> Dict[str, Any]:
    """The JSON record of prototype ``k`` of class ``c`` in a loaded gallery."""
    record = gallery['prototypes'][c * gallery['num_prototypes'] + k]
    assert record['class'] == c and record['prototype'] == k
    return record


# --------------------------------------------------------------------------- the page
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px 24px;color:#222;
 font-size:14px;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 4px}
.meta{color:#555;margin:2px 0}.note{color:#444;max-width:70em}
table{border-collapse:collapse}th,td{padding:3px 8px;text-align:left;vertical-align:middle}
thead th{border-bottom:1px solid #999;font-weight:600;font-size:13px}
tbody tr{border-bottom:1px solid #e3e3e3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;margin-right:5px;
 vertical-align:-1px}
.bar{display:inline-block;width:70px;height:8px;background:#eee;margin-right:6px}
.bar span{display:block;height:8px;background:#3b7dd8}
.flag{display:inline-block;padding:1px 5px;border-radius:3px;font-size:12px;margin:1px 0}
.dead{background:#fde2e1;color:#a11}.dup{background:#fff1c9;color:#7a5600}
tr.dead-row{color:#999}
.crops{white-space:nowrap}.crops figure{display:inline-block;margin:0 3px 0 0;text-align:center}
.crops img{display:block;width:64px;height:64px;border:1px solid #bbb}
.crops figcaption{font-size:11px;color:#555}
nav a{margin-right:10px}
"""


def _fmt(value: Optional[float], spec: str = '.2f') -> str:
    return '-' if value is None else format(value, spec)


def _swatch(rgb: Sequence[int]) -> str:
    return '<span class="swatch" style="background:rgb({},{},{})"></span>'.format(*rgb)


def report_rows(gallery: Dict[str, Any], c: int) -> List[Dict[str, Any]]:
    """Class ``c``'s prototype records as the page lists them: most used first."""
    k = gallery['num_prototypes']
    rows = [prototype_record(gallery, c, j) for j in range(k)]
    return sorted(rows, key=lambda r: (-r['pixels'], r['prototype']))


def write_report_html(gallery: Dict[str, Any], out_dir: str,
                      title: str = 'Prototype report') -> str:
    """Write the static page ``out_dir/index.html`` for a gallery dict; return its path.

    A header with the split, the run and the health figures per class, then per class one
    row per prototype (most used first): use share, pixels, mean cosine, flags (dead:
    no pixel; near-duplicate: cosine above the threshold to another prototype) and its
    N crops. Images are the relative ``crops/`` files: the page opens from disk.

    Args:
        gallery (dict): From :func:`save_gallery` or :func:`load_gallery`.
        out_dir (str): Folder that holds ``gallery.json`` and ``crops/``.
        title (str): Page title. Default: 'Prototype report'.
    """
    esc = html.escape
    g = gallery
    classes, palette, health = g['classes'], g['palette'], g['health']
    k = g['num_prototypes']
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             f'<title>{esc(title)}</title><style>{_CSS}</style></head><body>',
             f'<h1>{esc(title)}</h1>']
    info = [f"checkpoint <code>{esc(str(g.get('checkpoint', '?')))}</code>",
            f"config <code>{esc(str(g.get('config', '?')))}</code>"]
    parts.append(f'<p class="meta">{", ".join(info)}</p>')
    seconds = g.get('seconds')
    per_image = (f" (at most {g['per_image']} per image)" if g.get('per_image') else '')
    timing = f', gallery pass {seconds:.0f} s' if isinstance(seconds, (int, float)) else ''
    parts.append(
        f"<p class=\"meta\">{esc(str(g.get('split', '?')))} split, {g['num_images']} images "
        f"(test pipeline: no random augmentation), {g['num_classes']} classes x {k} "
        f"prototypes, top {g['per_prototype']} pixels per prototype{per_image}, near-duplicate "
        f"cosine &gt; {g['duplicate_cosine']}{esc(timing)}</p>")
    parts.append(
        '<p class="note">Every labelled pixel (of the decoder\'s feature grid) is filed under '
        'the prototype of its own class nearest to it, the rule of inference. <b>Use</b>: '
        'share of the class\'s pixels filed under the prototype; <b>mean cos</b>: their mean '
        'cosine similarity to it; the crops are the filed pixels most similar to it '
        '(marked at the centre), most similar first. <span class="flag dead">dead</span>: no '
        'pixel filed; <span class="flag dup">near-duplicate</span>: another prototype\'s '
        'cosine to it is above the threshold.</p>')
    parts.append('<nav>' + ''.join(f'<a href="#class-{c}">{esc(name)}</a>'
                                   for c, name in enumerate(classes)) + '</nav>')
    # Health figures (tools/analysis_tools/prototype_health.py, same rule).
    parts.append('<h2>Health</h2><table class="health"><thead><tr><th>class</th>'
                 '<th>pixels</th><th>effective prototypes (&ge; 1%)</th>'
                 '<th>exp-entropy of use</th><th>cosine min / mean / max</th>'
                 '<th>dead</th><th>near-duplicates</th></tr></thead><tbody>')
    for c, name in enumerate(classes):
        recs = [prototype_record(g, c, j) for j in range(k)]
        dead = sum(r['dead'] for r in recs)
        dup = sum(bool(r['duplicates']) for r in recs)
        parts.append(
            f'<tr><td>{_swatch(palette[c])}<a href="#class-{c}">{esc(name)}</a></td>'
            f'<td class="num">{g["class_pixels"][c]}</td>'
            f'<td class="num">{_fmt(health["effective"][c], ".0f")}</td>'
            f'<td class="num">{_fmt(health["exp_entropy"][c])}</td>'
            f'<td class="num">{_fmt(health["cos_min"][c])} / {_fmt(health["cos_mean"][c])} / '
            f'{_fmt(health["cos_max"][c])}</td><td class="num">{dead}</td>'
            f'<td class="num">{dup}</td></tr>')
    parts.append('</tbody></table>')
    for c, name in enumerate(classes):
        parts.append(f'<h2 id="class-{c}">{_swatch(palette[c])}{esc(name)}</h2>')
        pixels = g['class_pixels'][c]
        parts.append(f'<p class="meta">{pixels} labelled pixels'
                     + ('' if pixels else ': the class does not occur in these images, so '
                        'none of its prototypes is used') + '</p>')
        parts.append('<table class="prototypes"><thead><tr><th>prototype</th><th>use</th>'
                     '<th>pixels</th><th>mean cos</th><th>flags</th>'
                     '<th>most similar pixels filed under it</th></tr></thead><tbody>')
        for r in report_rows(g, c):
            flags = []
            if r['dead']:
                flags.append('<span class="flag dead">dead</span>')
            for d in r['duplicates']:
                flags.append(f'<span class="flag dup">near-duplicate of {esc(d["class_name"])}'
                             f' #{d["prototype"]} ({d["cosine"]:.3f})</span>')
            share = r['use_share'] or 0.0
            crops = []
            for e in r['top']:
                img = g['images'][e['image']]
                tip = (f"{osp.basename(str(img['path']))} (y {e['y']}, x {e['x']}), "
                       f"cos {e['similarity']:.3f}")
                crops.append(f'<figure><img class="crop" src="{esc(e["crop"])}" alt="'
                             f'{esc(tip)}" title="{esc(tip)}"><figcaption>'
                             f'{e["similarity"]:.2f}</figcaption></figure>')
            parts.append(
                f'<tr class="prototype{" dead-row" if r["dead"] else ""}" data-class="{c}" '
                f'data-prototype="{r["prototype"]}" data-pixels="{r["pixels"]}">'
                f'<td>{esc(name)} #{r["prototype"]}</td>'
                f'<td class="num"><span class="bar"><span style="width:{100 * share:.1f}%">'
                f'</span></span>{100 * share:.1f}%</td><td class="num">{r["pixels"]}</td>'
                f'<td class="num">{_fmt(r["mean_similarity"], ".3f")}</td>'
                f'<td>{"<br>".join(flags)}</td><td class="crops">{"".join(crops)}</td></tr>')
        parts.append('</tbody></table>')
    parts.append('</body></html>\n')
    path = osp.join(out_dir, REPORT_FILE)
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts))
    return path


# ------------------------------------------------------------------ explaining a pixel
@dataclass
class ClassEvidence:
    """One class's case for a pixel.

    Attributes:
        class_id (int): Class index.
        class_name (str): Class name.
        score (float): The model's score (segmentation logit) of the class at the pixel.
        prototype (int): The class's prototype nearest to the pixel.
        similarity (float): Its cosine similarity to the pixel's embedding.
        gallery (list[dict]): That prototype's gallery pixels (``image_path``, ``y``, ``x``,
            ``similarity``, ``crop``: an absolute path when the gallery's folder is known).
        pixels (int): Gallery pixels filed under the prototype (its use).
        use_share (float): Their share of the class's gallery pixels.
    """
    class_id: int
    class_name: str
    score: float
    prototype: int
    similarity: float
    gallery: List[Dict[str, Any]]
    pixels: int = 0
    use_share: Optional[float] = None


@dataclass
class PixelExplanation:
    """Why a pixel got its class: the winning prototype and its training pixels.

    Attributes:
        image (str | None): Image file (None for an array).
        pixel (tuple[int, int]): (y, x) in original-image coordinates.
        image_shape (tuple[int, int]): (H, W) of the image.
        predicted (ClassEvidence): The predicted class and its winning prototype.
        runners_up (list[ClassEvidence]): The next classes by score, best first.
    """
    image: Optional[str]
    pixel: Tuple[int, int]
    image_shape: Tuple[int, int]
    predicted: ClassEvidence
    runners_up: List[ClassEvidence]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def check_gallery_model(gallery: Dict[str, Any], model: nn.Module) -> None:
    """Raise ValueError unless ``gallery`` was built with ``model``'s prototypes."""
    protos = proto_head(model).prototypes
    c, k, _ = protos.shape
    if (gallery['num_classes'], gallery['num_prototypes']) != (c, k):
        raise ValueError(
            f"The gallery has {gallery['num_classes']} classes x {gallery['num_prototypes']} "
            f'prototypes, the model {c} x {k}: build the gallery from this checkpoint '
            '(tools/analysis_tools/prototype_report.py CONFIG CHECKPOINT --out DIR)')
    if gallery['prototype_fingerprint'] != prototype_fingerprint(protos):
        raise ValueError(
            f"The gallery was built from another checkpoint ({gallery.get('checkpoint')}): "
            "its prototypes differ from this model's. Build the gallery from this checkpoint "
            '(tools/analysis_tools/prototype_report.py CONFIG CHECKPOINT --out DIR)')


def _gallery_pixels(gallery: Dict[str, Any], c: int, k: int) -> Tuple[
        List[Dict[str, Any]], Dict[str, Any]]:
    record = prototype_record(gallery, c, k)
    root = gallery.get('root')
    rows = []
    for e in record['top']:
        rows.append(dict(image_path=gallery['images'][e['image']]['path'], y=e['y'],
                         x=e['x'], similarity=e['similarity'],
                         crop=osp.join(root, e['crop']) if root else e['crop']))
    return rows, record


def image_size(image: ImageType) -> Tuple[int, int]:
    """(H, W) of an image file or array."""
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    from PIL import Image
    if not osp.isfile(str(image)):
        raise FileNotFoundError(f'No such image: {image}')
    with Image.open(image) as img:
        return int(img.height), int(img.width)


def check_pixel(pixel: Sequence[int], shape: Tuple[int, int]) -> Tuple[int, int]:
    """(y, x) as ints, or ValueError saying the valid range."""
    if len(pixel) != 2:
        raise ValueError(f'A pixel is (y, x), got {tuple(pixel)}')
    y, x = (int(v) for v in pixel)
    h, w = shape
    if not (0 <= y < h and 0 <= x < w):
        raise ValueError(f'Pixel (y, x) = ({y}, {x}) is outside the {h}x{w} image (H x W): '
                         f'y must be in [0, {h - 1}] and x in [0, {w - 1}]')
    return y, x


@torch.no_grad()
def explain_pixel(model: nn.Module, image: ImageType, pixel: Sequence[int],
                  gallery: Union[str, Dict[str, Any]],
                  runners_up: int = 2) -> PixelExplanation:
    """Explain the class of one pixel by its nearest prototypes and their gallery pixels.

    The prediction and class scores are the model's (logits upsampled to the original
    size, as in inference); the similarities are :func:`~.prototypes.prototype_similarity`
    at the pixel. Classes are ranked by score; each gets its prototype nearest to the pixel.

    Args:
        model (nn.Module): ProtoSeg segmentor from :func:`~.prototypes.load_model`.
        image (str | np.ndarray): Image file or BGR array.
        pixel (Sequence[int]): (y, x) in original-image coordinates.
        gallery (str | dict): ``gallery.json`` (or its folder), or a dict from
            :func:`load_gallery` / :func:`save_gallery`, built from this model.
        runners_up (int): Runner-up classes to give. Default: 2.

    Returns:
        PixelExplanation: The predicted class's evidence and the runners-up's.

    Raises:
        ValueError: if the pixel is outside the image or the gallery is another model's.
    """
    gallery = load_gallery(gallery) if isinstance(gallery, str) else gallery
    check_gallery_model(gallery, model)
    head = proto_head(model)
    y, x = check_pixel(pixel, image_size(image))
    data = preprocess_image(model, image)
    result = model.predict(data['inputs'], data['data_samples'])[0]
    c = head.num_classes
    scores = result.seg_logits.data[:c, y, x].float().cpu()
    predicted = int(result.pred_sem_seg.data[0, y, x])
    sims = prototype_similarity(model, image)[:, :, y, x].float().cpu()  # (C, K)
    order = [predicted] + [int(j) for j in torch.argsort(scores, descending=True)
                           if int(j) != predicted]
    classes = gallery['classes']
    evidence = []
    for cls in order[:1 + max(0, runners_up)]:
        best, k = sims[cls].max(dim=0)
        rows, record = _gallery_pixels(gallery, cls, int(k))
        evidence.append(ClassEvidence(
            class_id=cls, class_name=classes[cls], score=float(scores[cls]),
            prototype=int(k), similarity=float(best), gallery=rows,
            pixels=record['pixels'], use_share=record['use_share']))
    return PixelExplanation(image=image if isinstance(image, str) else None, pixel=(y, x),
                            image_shape=tuple(result.pred_sem_seg.data.shape[-2:]),
                            predicted=evidence[0], runners_up=evidence[1:])


def write_explanation_html(explanation: PixelExplanation, out_file: str,
                           image: Optional[np.ndarray] = None, crop_size: int = 64) -> str:
    """Write a static page for a :class:`PixelExplanation`; images go to ``<stem>_files/``.

    Args:
        explanation (PixelExplanation): From :func:`explain_pixel`.
        out_file (str): The ``.html`` file.
        image (np.ndarray, optional): RGB image (default: read ``explanation.image``).
        crop_size (int): Side of the query crop. Default: 64.
    """
    esc = html.escape
    stem = osp.splitext(osp.basename(out_file))[0]
    files = osp.join(osp.dirname(osp.abspath(out_file)), f'{stem}_files')
    os.makedirs(files, exist_ok=True)
    if image is None:
        image = _read_rgb(explanation.image)
    y, x = explanation.pixel
    _write_png(osp.join(files, 'image.png'), draw_marker(image.copy(), y, x, radius=5))
    _write_png(osp.join(files, 'query.png'), crop_around(image, y, x, crop_size))
    p = explanation.predicted
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Why '
             f'{esc(p.class_name)}?</title><style>{_CSS}</style></head><body>',
             f'<h1>Pixel (y {y}, x {x}): {esc(p.class_name)}</h1>',
             f'<p class="meta">{esc(str(explanation.image))}</p>',
             f'<p><img src="{stem}_files/image.png" alt="image" style="max-width:480px">'
             f' <img src="{stem}_files/query.png" alt="pixel" width="128" height="128"></p>',
             f'<p>Predicted <b>{esc(p.class_name)}</b> (score {p.score:.3f}): of the '
             f'{esc(p.class_name)} prototypes, the pixel is nearest to <b>#{p.prototype}</b> '
             f'(cosine {p.similarity:.3f}), which stands for the training pixels in its '
             'row below.</p>',
             '<table class="prototypes"><thead><tr><th>class</th><th>score</th>'
             '<th>nearest prototype</th><th>cos</th><th>its gallery pixels</th></tr></thead>'
             '<tbody>']
    for rank, ev in enumerate([p] + list(explanation.runners_up)):
        crops = []
        for j, e in enumerate(ev.gallery):
            name = f'c{ev.class_id}_k{ev.prototype}_{j}.png'
            shutil.copyfile(e['crop'], osp.join(files, name))
            tip = f"{osp.basename(str(e['image_path']))} (y {e['y']}, x {e['x']})"
            crops.append(f'<figure><img class="crop" src="{stem}_files/{name}" alt="{esc(tip)}"'
                         f' title="{esc(tip)}"><figcaption>{e["similarity"]:.2f}</figcaption>'
                         '</figure>')
        parts.append(f'<tr class="evidence" data-rank="{rank}"><td>{esc(ev.class_name)}</td>'
                     f'<td class="num">{ev.score:.3f}</td><td>#{ev.prototype}</td>'
                     f'<td class="num">{ev.similarity:.3f}</td>'
                     f'<td class="crops">{"".join(crops)}</td></tr>')
    parts.append('</tbody></table></body></html>\n')
    with open(out_file, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts))
    return out_file

