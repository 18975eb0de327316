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
:func:`~.prototype_report_page.write_report_html` writes the static page of
``tools/analysis_tools/prototype_report.py``; :func:`~.pixel_explanation.explain_pixel`
explains one pixel of a new image by the gallery ("this looks like that"), used by
``tools/analysis_tools/explain_pixel.py``.

Prototypes that training never moved from their random initialisation (a held-out class, a
class absent from every training batch) are flagged (:func:`untrained_prototypes`): pixels
filed under them say nothing learned. A gallery read back (:func:`load_gallery`) is checked
entry by entry, and its crop paths must resolve inside its folder (:func:`resolve_crop`), so
that a received or edited ``gallery.json`` cannot make a tool read other files.
"""
import copy
import hashlib
import json
import math
import os
import os.path as osp
import shutil
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..evaluation.prototype_health import prototype_health
from ..models.utils.prototype_scorer import PrototypeScorer
from .image_crops import crop_around, read_rgb, write_png
from .prototypes import _valid_grid, checked_dataset_meta, pixel_features, proto_head
from .top_n import TopN

GALLERY_FORMAT = 'mmseg_proto prototype gallery'
GALLERY_VERSION = 1
GALLERY_FILE = 'gallery.json'
REPORT_FILE = 'index.html'
CROP_DIR = 'crops'
#: Columns of the items kept per gallery pixel.
ITEM_FIELDS = ('image', 'y', 'x', 'grid_y', 'grid_x')


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
        untrained (Tensor, optional): (C, K) bool, the prototypes training never moved
            from their initialisation (:func:`untrained_prototypes`); None: not known.
        untrained_check (str): How ``untrained`` was decided, or why it is not known.
    """
    classes: List[str]
    palette: List[List[int]]
    prototypes: Tensor
    counts: Tensor
    similarity_sums: Tensor
    top: TopN
    images: List[Dict[str, Any]] = field(default_factory=list)
    per_image: int = 0
    untrained: Optional[Tensor] = None
    untrained_check: str = 'not checked'

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


#: Largest difference of a coordinate to the initial value for a prototype still "at" it:
#: one momentum update (mu <= 0.999) moves a unit prototype's coordinates by ~1e-4.
UNTRAINED_ATOL = 1e-6


def initial_prototypes(model: nn.Module, seed: int) -> Tensor:
    """The decode head's prototypes as a training run seeded ``seed`` initialised them.

    mmengine's ``Runner`` seeds ``random``, numpy and torch with ``randomness.seed`` (the
    ``meta.seed`` every checkpoint records) and then builds ``cfg.model``; this rebuilds it
    the same way on CPU, leaving the process's random states as they were.

    Args:
        model (nn.Module): Segmentor with ``cfg`` (e.g. from :func:`~.prototypes.load_model`).
        seed (int): The run's seed.

    Returns:
        Tensor: (C, K, D) the initial prototypes.
    """
    import random

    import numpy as np
    from mmseg.registry import MODELS
    cfg = model.cfg
    model_cfg = copy.deepcopy(cfg.model)
    if cfg.get('data_preprocessor') is not None:  # as the Runner merges it
        model_cfg.setdefault('data_preprocessor', copy.deepcopy(cfg.data_preprocessor))
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.random.default_generator.manual_seed(seed)
            fresh = MODELS.build(model_cfg)
            return proto_head(fresh).prototypes.detach().float().cpu().clone()
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def untrained_prototypes(model: nn.Module) -> Tuple[Optional[Tensor], str]:
    """Which prototypes training never moved from their random initialisation.

    Criterion: a prototype is untrained when every coordinate is within
    :data:`UNTRAINED_ATOL` of the value :func:`initial_prototypes` rebuilds from the
    checkpoint's seed (``model.checkpoint_seed``, set by :func:`~.prototypes.load_model`).
    The bank changes a prototype only by a momentum update (from the correctly classified
    pixels assigned to it), a re-seeding or a load, and leaves the others bit-identical,
    so a class that was held out or absent from every training batch keeps all of them.
    A prototype loaded from a pretrained checkpoint (``load_from``) counts as trained.
    Where the initialisation cannot be rebuilt (no seed, another architecture) nothing
    matches and nothing is flagged.

    Returns:
        tuple: ((C, K) bool Tensor or None when not known, how it was decided).
    """
    seed = getattr(model, 'checkpoint_seed', None)
    if not _is_int(seed):
        return None, ('not checked: the checkpoint records no seed (meta.seed), so its '
                      'initial prototypes cannot be rebuilt')
    protos = proto_head(model).prototypes.detach().float().cpu()
    try:
        initial = initial_prototypes(model, seed)
    except Exception as err:  # a config this process cannot rebuild: say so, flag nothing
        return None, f'not checked: rebuilding the initial prototypes failed ({err!r:.200})'
    if initial.shape != protos.shape:
        return None, 'not checked: the rebuilt model has prototypes of another shape'
    untrained = (protos - initial).abs().amax(dim=-1) <= UNTRAINED_ATOL
    return untrained, (f"prototypes still at the initialisation that the config builds under "
                       f"the checkpoint's seed {seed}")


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
    classes, palette = checked_dataset_meta(getattr(model, 'dataset_meta', None), c,
                                            'the model')
    untrained, untrained_check = untrained_prototypes(model)
    return PrototypeGallery(classes=classes, palette=palette, prototypes=protos.float().cpu(),
                            counts=counts.view(c, k), similarity_sums=sums.view(c, k), top=top,
                            images=images, per_image=per_image, untrained=untrained,
                            untrained_check=untrained_check)


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

    Per prototype the JSON has ``untrained`` (true, false, or null when not known) and at
    the top ``untrained_check`` (how it was decided) and ``untrained_classes`` (classes whose
    prototypes all are untrained; their ``health`` figures are null). Class names that are
    not strings and a palette that does not fit are repaired with a warning
    (:func:`~.prototypes.checked_dataset_meta`) before anything is written.
    """
    c, k = gallery.num_classes, gallery.num_prototypes
    # Checked before anything is written (names and colours go into the JSON and page).
    classes, palette = checked_dataset_meta(
        dict(classes=gallery.classes, palette=gallery.palette), c, 'the gallery')
    untrained = gallery.untrained
    if untrained is not None and tuple(untrained.shape) != (c, k):
        raise ValueError(f'PrototypeGallery.untrained has shape {tuple(untrained.shape)}, '
                         f'the prototypes {(c, k)}')
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
        image = read_rgb(gallery.images[index]['path'])
        for entry in rows:
            write_png(osp.join(out_dir, entry['crop']),
                       crop_around(image, entry['y'], entry['x'], crop_size))
    dups: Dict[Tuple[int, int], List[Dict[str, Any]]] = {}
    for c1, k1, c2, k2, cos in near_duplicates(gallery.prototypes, duplicate_cosine):
        dups.setdefault((c1, k1), []).append(dict(
            **{'class': c2}, class_name=classes[c2], prototype=k2,
            cosine=round(cos, 6)))
        dups.setdefault((c2, k2), []).append(dict(
            **{'class': c1}, class_name=classes[c1], prototype=k1,
            cosine=round(cos, 6)))
    share, mean = gallery.use_share(), gallery.mean_similarity()
    health = prototype_health(gallery.prototypes, gallery.counts)
    # Classes whose prototypes were all never trained: their health figures describe random
    # vectors, so they get none.
    never = [] if untrained is None else [int(ci) for ci in torch.nonzero(
        untrained.all(dim=1)).flatten()]
    prototypes = []
    for ci in range(c):
        for ki in range(k):
            rows = entries[(ci, ki)]
            prototypes.append({
                'class': ci, 'class_name': classes[ci], 'prototype': ki,
                'pixels': int(gallery.counts[ci, ki]),
                'use_share': _finite(float(share[ci, ki])),
                'mean_similarity': _finite(float(mean[ci, ki])),
                'dead': bool(gallery.counts[ci, ki] == 0),
                'untrained': None if untrained is None else bool(untrained[ci, ki]),
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
        classes=classes, palette=palette,
        class_pixels=[int(p) for p in gallery.class_pixels()],
        health={key: [None if ci in never else _finite(float(v))
                      for ci, v in enumerate(value)] for key, value in health.items()},
        untrained_check=gallery.untrained_check, untrained_classes=never,
        images=gallery.images, prototypes=prototypes)
    with open(osp.join(out_dir, GALLERY_FILE), 'w') as f:
        json.dump(out, f, indent=1)
    out['root'] = osp.abspath(out_dir)  # as load_gallery gives it; not in the file
    return out


def load_gallery(path: str) -> Dict[str, Any]:
    """Read and check a ``gallery.json``; adds ``root``, its folder (crop paths are relative
    to it and must resolve inside it).

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a gallery written by :func:`save_gallery`, or an
            entry is missing, of the wrong type or points outside the folder (says which).
    """
    if osp.isdir(path):
        path = osp.join(path, GALLERY_FILE)
    if not osp.isfile(path):
        raise FileNotFoundError(f'No gallery file {path}: write one with '
                                'tools/analysis_tools/prototype_report.py CONFIG CHECKPOINT '
                                '--out DIR (it writes DIR/gallery.json)')
    with open(path, encoding='utf-8') as f:
        try:
            data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f'{path} is not JSON: {err}') from None
    if not isinstance(data, dict) or data.get('format') != GALLERY_FORMAT:
        raise ValueError(f'{path} is not a prototype gallery (written by '
                         'tools/analysis_tools/prototype_report.py)')
    data['root'] = osp.dirname(osp.abspath(path))
    check_gallery(data, source=path)
    return data


class _Schema:
    """Type checks of gallery entries that raise one ValueError naming the entry."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, what: str) -> None:
        raise ValueError(f'{self.source}: {where.strip()} {what}; rebuild the gallery with '
                         'tools/analysis_tools/prototype_report.py CONFIG CHECKPOINT --out DIR')

    def get(self, data: Dict[str, Any], key: str, where: str) -> Any:
        if not isinstance(data, dict):
            self.fail(where, f'must be a JSON object, got {type(data).__name__}')
        if key not in data:
            self.fail(f'{where}{key!r}', 'is missing')
        return data[key]

    def int(self, data: Dict[str, Any], key: str, where: str = '', low: int = 0,
            high: Optional[int] = None) -> int:
        value = self.get(data, key, where)
        if not _is_int(value) or value < low or (high is not None and value >= high):
            bound = f'[{low}, {high - 1}]' if high is not None else f'>= {low}'
            self.fail(f'{where}{key!r}', f'must be an integer in {bound}, got {value!r:.60}')
        return value

    def number(self, data: Dict[str, Any], key: str, where: str = '',
               optional: bool = False) -> Optional[float]:
        value = self.get(data, key, where)
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(f'{where}{key!r}', f'must be a number, got {value!r:.60}')
        return float(value)

    def list(self, data: Dict[str, Any], key: str, where: str = '',
             length: Optional[int] = None) -> List[Any]:
        value = self.get(data, key, where)
        if not isinstance(value, list):
            self.fail(f'{where}{key!r}', f'must be a list, got {type(value).__name__}')
        if length is not None and len(value) != length:
            self.fail(f'{where}{key!r}', f'has {len(value)} entries, the gallery says '
                      f'{length}')
        return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_gallery(data: Dict[str, Any], root: Optional[str] = None,
                  source: str = 'the gallery') -> None:
    """Check every entry a gallery's readers use, before anything reads a crop.

    Checks the types and lengths of the entries (classes, palette, health figures, one
    record per prototype in buffer order, image indices in range) and that every crop path
    is relative and resolves (symbolic links followed) inside the gallery's folder, so that
    a received or hand-edited ``gallery.json`` cannot make a tool read or copy other files.

    Args:
        data (dict): The gallery dict (:func:`save_gallery`, :func:`load_gallery`).
        root (str, optional): Its folder. Default: ``data['root']``.
        source (str): How messages name the gallery. Default: 'the gallery'.

    Raises:
        ValueError: naming the first entry that is missing, of the wrong type or outside.
    """
    s = _Schema(source)
    if not isinstance(data, dict):
        s.fail('the gallery', f'must be a JSON object, got {type(data).__name__}')
    root = data.get('root') if root is None else root
    if not isinstance(root, str):
        s.fail("'root'", '(the folder of gallery.json) is unknown: read the gallery with '
               'load_gallery(path)')
    c = s.int(data, 'num_classes', low=1)
    k = s.int(data, 'num_prototypes', low=1)
    if not isinstance(s.get(data, 'prototype_fingerprint', ''), str):
        s.fail("'prototype_fingerprint'", 'must be a string')
    for key in ('num_images', 'per_prototype'):
        s.int(data, key)
    s.number(data, 'duplicate_cosine')
    if not all(isinstance(n, str) for n in s.list(data, 'classes', length=c)):
        s.fail("'classes'", 'must be a list of class names (strings)')
    for j, rgb in enumerate(s.list(data, 'palette', length=c)):
        if not (isinstance(rgb, list) and len(rgb) == 3
                and all(_is_int(v) and 0 <= v <= 255 for v in rgb)):
            s.fail(f"'palette'[{j}]", f'must be [R, G, B] in 0-255, got {rgb!r:.60}')
    if not all(_is_int(v) and v >= 0 for v in s.list(data, 'class_pixels', length=c)):
        s.fail("'class_pixels'", 'must be a list of pixel counts (integers >= 0)')
    health = s.get(data, 'health', '')
    for key in ('effective', 'exp_entropy', 'cos_min', 'cos_mean', 'cos_max'):
        for j, v in enumerate(s.list(health, key, "'health' ", length=c)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                s.fail(f"'health' {key!r}[{j}]", f'must be a number or null, got {v!r:.60}')
    images = s.list(data, 'images')
    for j, image in enumerate(images):
        path = s.get(image, 'path', f"'images'[{j}] ")
        if not (path is None or isinstance(path, str)):
            s.fail(f"'images'[{j}] 'path'", 'must be a string or null')
    records = s.list(data, 'prototypes', length=c * k)
    for j, record in enumerate(records):
        _check_record(s, record, j // k, j % k, c, k, len(images), root)


def _check_record(s: _Schema, record: Dict[str, Any], c: int, k: int, num_classes: int,
                  num_prototypes: int, num_images: int, root: str) -> None:
    """One prototype record of a gallery (see :func:`check_gallery`)."""
    where = f"'prototypes'[{c * num_prototypes + k}] "
    if (s.int(record, 'class', where), s.int(record, 'prototype', where)) != (c, k):
        s.fail(where, f"is class {record['class']} prototype {record['prototype']}, but "
               f'buffer order puts class {c} prototype {k} there')
    s.int(record, 'pixels', where)
    if record.get('untrained') not in (None, True, False):
        s.fail(f"{where}'untrained'", 'must be true, false or null')
    s.number(record, 'use_share', where, optional=True)
    s.number(record, 'mean_similarity', where, optional=True)
    if not isinstance(s.get(record, 'dead', where), bool):
        s.fail(f"{where}'dead'", 'must be true or false')
    for j, dup in enumerate(s.list(record, 'duplicates', where)):
        at = f"{where}'duplicates'[{j}] "
        s.int(dup, 'class', at, high=num_classes)
        s.int(dup, 'prototype', at, high=num_prototypes)
        s.number(dup, 'cosine', at)
        if not isinstance(s.get(dup, 'class_name', at), str):
            s.fail(f"{at}'class_name'", 'must be a string')
    for j, entry in enumerate(s.list(record, 'top', where)):
        at = f"{where}'top'[{j}] "
        s.int(entry, 'image', at, high=num_images)
        s.int(entry, 'y', at)
        s.int(entry, 'x', at)
        s.number(entry, 'similarity', at)
        try:
            resolve_crop(root, s.get(entry, 'crop', at))
        except ValueError as err:
            s.fail(f"{at}'crop'", str(err))


def resolve_crop(root: str, crop: Any) -> str:
    """The file of a gallery crop path: ``crop`` relative to the gallery's folder ``root``,
    symbolic links resolved, inside that folder.

    Args:
        root (str): The folder of ``gallery.json``.
        crop (str): The crop path as the gallery holds it (e.g. ``crops/c000_k000_000.png``).

    Returns:
        str: The resolved absolute path (it may not exist).

    Raises:
        ValueError: if ``crop`` is not a string, is absolute, or resolves outside ``root``.
    """
    if not isinstance(crop, str) or not crop:
        raise ValueError(f'must be a path relative to the gallery folder, got {crop!r:.60}')
    if osp.isabs(crop) or osp.splitdrive(crop)[0] or '\x00' in crop:
        raise ValueError(f'{crop!r:.200} is not a path relative to the gallery folder: '
                         'crops are read only from inside the folder of gallery.json')
    folder = osp.realpath(root)
    path = osp.realpath(osp.join(folder, crop))
    if osp.commonpath([folder, path]) != folder:
        raise ValueError(f'{crop!r:.200} resolves to {path!r:.200}, outside the gallery folder '
                         f'{folder}: crops are read only from inside the folder of '
                         'gallery.json')
    return path


def prototype_record(gallery: Dict[str, Any], c: int, k: int) -> Dict[str, Any]:
    """The JSON record of prototype ``k`` of class ``c`` in a checked gallery.

    Raises:
        ValueError: if the gallery has no such record (see :func:`check_gallery`).
    """
    num_classes, num_prototypes = gallery['num_classes'], gallery['num_prototypes']
    records = gallery['prototypes']
    if not (0 <= c < num_classes and 0 <= k < num_prototypes
            and len(records) == num_classes * num_prototypes):
        raise ValueError(f'The gallery has no record of class {c} prototype {k} (it has '
                         f'{num_classes} classes x {num_prototypes} prototypes and '
                         f'{len(records)} records)')
    record = records[c * num_prototypes + k]
    if (record.get('class'), record.get('prototype')) != (c, k):
        raise ValueError(f'The gallery record of class {c} prototype {k} is out of order '
                         f"(class {record.get('class')}, prototype {record.get('prototype')})")
    return record
