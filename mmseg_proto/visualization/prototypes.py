"""Pixel embeddings, prototype similarity maps and 2-D projections.

Used by ``tools/visualization/vis_prototype_similarity.py`` (the paper's Fig. 3) and
``tools/visualization/vis_embedding.py`` (Fig. 5). Everything runs on CPU by default and
under ``torch.no_grad``.
"""
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.decode_heads.proto_head import ProtoHead

ImageType = Union[str, np.ndarray]
METHODS = ('pca', 'tsne')


def load_model(config: str, checkpoint: str,
               device: str = 'cpu') -> nn.Module:
    """Build a segmentor from a config and load its checkpoint.

    Like :func:`mmseg.apis.init_model`, but the class names and palette come
    from the checkpoint's ``meta.dataset_meta`` or, when it has none, from
    the config's test dataset (its ``metainfo`` override or its class'
    ``METAINFO``), never from a guess by number of classes.

    Args:
        config (str): Config file.
        checkpoint (str): Checkpoint file.
        device (str): Device to run on. Default: 'cpu'.

    Class names that are not strings (e.g. integers) become ``str()`` of
    them, and a palette that does not give one RGB colour per class is
    replaced by a generated one, each with a warning
    (:func:`checked_dataset_meta`): this happens here, before a tool writes
    anything.

    Returns:
        nn.Module: The segmentor in eval mode, with ``cfg``,
        ``dataset_meta`` (``classes``, ``palette``) and ``checkpoint_seed``
        (the checkpoint's ``meta.seed``, None if it has none) set.
    """
    import mmseg_proto  # noqa: F401  (registers the plugin modules)
    from mmengine.config import Config
    from mmengine.runner import load_checkpoint
    from mmseg.apis import init_model

    cfg = Config.fromfile(config)
    model = init_model(cfg, None, device=device)
    try:
        ckpt = load_checkpoint(model, checkpoint, map_location='cpu',
                               strict=True)
    except RuntimeError as err:
        raise RuntimeError(
            f'{checkpoint} does not fit the model of {config} (is it a '
            f'checkpoint of another config?): {err}') from err
    ckpt_meta = ckpt.get('meta') if isinstance(ckpt, dict) else None
    ckpt_meta = ckpt_meta if isinstance(ckpt_meta, dict) else {}
    meta = ckpt_meta.get('dataset_meta')
    if not isinstance(meta, dict) or 'classes' not in meta or 'palette' not in meta:
        meta = _config_dataset_meta(cfg)
    num_classes = _num_classes(model)
    if meta is None or not isinstance(meta['classes'], Sequence) or len(
            meta['classes']) != num_classes:
        raise ValueError(
            f'Cannot tell the class names of {checkpoint}: the checkpoint '
            "has no meta['dataset_meta'] and the config's test dataset gives "
            f'none for {num_classes} classes; set test_dataloader.dataset.'
            'metainfo=dict(classes=[...], palette=[...]) in the config')
    classes, palette = checked_dataset_meta(meta, num_classes, checkpoint)
    model.dataset_meta = dict(classes=classes, palette=palette)
    seed = ckpt_meta.get('seed')
    model.checkpoint_seed = seed if isinstance(seed, int) and not isinstance(
        seed, bool) else None
    model.to(device).eval()
    return model


def _generated_palette(num_classes: int) -> List[List[int]]:
    """One RGB colour per class, the same for the same number of classes."""
    rng = np.random.RandomState(0)
    return rng.randint(0, 256, (num_classes, 3)).tolist()


def _is_rgb(colour: Any) -> bool:
    return (isinstance(colour, (list, tuple)) and len(colour) == 3 and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool)
        and 0 <= v <= 255 for v in colour))


def checked_dataset_meta(meta: Optional[Dict], num_classes: int,
                         source: str = 'the checkpoint'
                         ) -> Tuple[List[str], List[List[int]]]:
    """Class names and palette fit for the tools: C strings and C RGB colours.

    Names that are not strings become ``str()`` of them; no names give
    '0', '1', ...; a palette that is missing, short, long or not RGB in
    0-255 is replaced by a generated one. Each repair comes with a warning.

    Args:
        meta (dict, optional): ``classes`` and ``palette`` (a dataset meta).
        num_classes (int): C, the model's number of classes.
        source (str): What the meta came from, for the messages.

    Returns:
        tuple[list[str], list[list[int]]]: (names, palette).

    Raises:
        ValueError: if ``classes`` is not a list of C names (which name is
            which class cannot be guessed).
    """
    meta = meta if isinstance(meta, dict) else {}
    classes = meta.get('classes')
    if classes is None:
        warnings.warn(f'{source} gives no class names: using 0..{num_classes - 1}')
        classes = [str(j) for j in range(num_classes)]
    if isinstance(classes, (str, bytes)) or not isinstance(
            classes, Sequence) or len(classes) != num_classes:
        raise ValueError(
            f'The class names of {source} ({classes!r:.200}) are not a list of '
            f'{num_classes} names, one per class of the model; set '
            'test_dataloader.dataset.metainfo=dict(classes=[...]) in the config')
    if not all(isinstance(n, str) for n in classes):
        warnings.warn(f'The class names of {source} are not all strings '
                      f'({list(classes)!r:.200}): using str() of each')
    names = [n if isinstance(n, str) else str(n) for n in classes]
    palette = meta.get('palette')
    if isinstance(palette, np.ndarray):
        palette = palette.tolist()
    if not (isinstance(palette, (list, tuple)) and len(palette) == num_classes
            and all(_is_rgb(p) for p in palette)):
        if palette is not None:
            warnings.warn(
                f'The palette of {source} ({palette!r:.200}) does not give one '
                f'RGB colour in 0-255 for each of the {num_classes} classes: '
                'using a generated palette')
        palette = _generated_palette(num_classes)
    return names, [[int(v) for v in p] for p in palette]


def _config_dataset_meta(cfg) -> Optional[Dict]:
    """classes/palette of the config's test dataset, if they are known."""
    from mmseg.registry import DATASETS
    loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
    if not loader:
        return None
    ds_cfg = loader['dataset']
    meta = dict(ds_cfg.get('metainfo') or {})
    ds_cls = DATASETS.get(ds_cfg['type']) if isinstance(
        ds_cfg['type'], str) else ds_cfg['type']
    base = dict(getattr(ds_cls, 'METAINFO', {}) or {})
    base.update(meta)
    if 'classes' not in base:
        return None
    if 'palette' not in base or len(base['palette']) != len(base['classes']):
        base['palette'] = _generated_palette(len(base['classes']))
    return base


def _num_classes(model: nn.Module) -> int:
    return int(model.decode_head.num_classes)


def class_indices(names: Optional[Sequence[str]],
                  classes: Sequence[str]) -> List[int]:
    """Indices of class ``names`` in ``classes`` (all classes if None).

    Raises:
        ValueError: naming the unknown classes and listing the known ones.
    """
    if not names:
        return list(range(len(classes)))
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ValueError(f'Unknown class name(s) {unknown}; this model knows '
                         f'{list(classes)}')
    return [list(classes).index(n) for n in names]


def proto_head(model: nn.Module) -> ProtoHead:
    """The model's :class:`ProtoHead` decode head.

    Raises:
        TypeError: if the decode head is not a ProtoHead (a parametric model).
    """
    head = model.decode_head
    if not isinstance(head, ProtoHead):
        raise TypeError(
            f'The decode head is {type(head).__name__}, not a ProtoHead: this '
            'needs a ProtoSeg model (a parametric model has no prototypes; '
            'tools/visualization/vis_embedding.py takes one with --parametric-config)')
    return head


def _test_pipeline(cfg) -> List[Dict]:
    pipeline = cfg.get('test_pipeline')
    if pipeline is None:
        loader = cfg.get('test_dataloader') or cfg.get('val_dataloader')
        pipeline = loader['dataset']['pipeline'] if loader else None
    if not pipeline:
        raise ValueError('The config has no test_pipeline (nor a '
                         'test_dataloader.dataset.pipeline) to load images')
    return [dict(t) for t in pipeline if t['type'] != 'LoadAnnotations']


def preprocess_image(model: nn.Module, img: ImageType) -> Dict:
    """Run the config's test pipeline and data preprocessor on one image.

    Args:
        model (nn.Module): Segmentor from :func:`load_model`.
        img (str | np.ndarray): Image file or BGR array.

    Returns:
        dict: ``inputs`` (1, 3, H, W) normalised batch and ``data_samples``
        (list of one SegDataSample with ``img_shape``/``ori_shape``).
    """
    from mmcv.transforms import Compose
    pipeline = _test_pipeline(model.cfg)
    if isinstance(img, np.ndarray):
        pipeline[0]['type'] = 'LoadImageFromNDArray'
        data = dict(img=img)
    else:
        data = dict(img_path=img)
    data = Compose(pipeline)(data)
    return model.data_preprocessor(
        dict(inputs=[data['inputs']], data_samples=[data['data_samples']]),
        False)


@torch.no_grad()
def pixel_features(model: nn.Module, inputs: Tensor,
                   kind: str = 'auto') -> Tensor:
    """Per-pixel features at the decoder's resolution, channel-last.

    Args:
        model (nn.Module): Segmentor.
        inputs (Tensor): (B, 3, H, W) preprocessed images.
        kind (str): 'proto' (ProtoHead embeddings, unit norm), 'decoder'
            (the input of the decode head's ``conv_seg`` classifier, i.e.
            the features a parametric model classifies) or 'auto' (proto
            for a ProtoHead, decoder otherwise). Default: 'auto'.

    Returns:
        Tensor: (B, h, w, D).
    """
    head = model.decode_head
    if kind == 'auto':
        kind = 'proto' if isinstance(head, ProtoHead) else 'decoder'
    feats = model.extract_feat(inputs)
    if kind == 'proto':
        return proto_head(model).embed(feats)
    if kind != 'decoder':
        raise ValueError(f"kind must be 'auto', 'proto' or 'decoder', got "
                         f'{kind!r}')
    conv_seg = getattr(head, 'conv_seg', None)
    if not isinstance(conv_seg, nn.Module):
        raise TypeError(f'{type(head).__name__} has no conv_seg classifier '
                        'whose input could be taken as the decoder features')
    captured: List[Tensor] = []
    handle = conv_seg.register_forward_pre_hook(
        lambda _m, args: captured.append(args[0]))
    try:
        head(feats)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f'{type(head).__name__}.forward did not call '
                           'conv_seg; cannot take the decoder features')
    return captured[-1].permute(0, 2, 3, 1)


def _valid_grid(shape: Tuple[int, int], padded: Tuple[int, int],
                img_shape: Tuple[int, int]) -> Tuple[int, int]:
    """Feature-grid size covering the unpadded image."""
    h, w = shape
    return (max(1, round(h * img_shape[0] / padded[0])),
            max(1, round(w * img_shape[1] / padded[1])))


@torch.no_grad()
def prototype_similarity(model: nn.Module, img: ImageType) -> Tensor:
    """Cosine similarity of every pixel to every prototype (paper Fig. 3).

    Embeddings come from the ProtoHead's ``embed`` on the backbone features
    of the test-pipeline image; the maps are upsampled (bilinear) to the
    decoder's input, cropped to the unpadded image and resized to the
    original image size.

    Args:
        model (nn.Module): ProtoSeg segmentor from :func:`load_model`.
        img (str | np.ndarray): Image file or BGR array.

    Returns:
        Tensor: (C, K, H, W) similarities in [-1, 1] at the original size.
    """
    head = proto_head(model)
    data = preprocess_image(model, img)
    inputs, sample = data['inputs'], data['data_samples'][0]
    emb = head.embed(model.extract_feat(inputs))[0]  # (h, w, D)
    c, k, _ = head.prototypes.shape
    sims = head.scorer.cosines(emb, head.prototypes).flatten(-2)  # (h, w, C*K)
    sims = sims.permute(2, 0, 1)[None].float()  # (1, C*K, h, w)
    sims = F.interpolate(sims, size=inputs.shape[-2:], mode='bilinear',
                         align_corners=head.align_corners)
    ih, iw = sample.img_shape[:2]
    sims = sims[..., :ih, :iw]
    sims = F.interpolate(sims, size=sample.ori_shape[:2], mode='bilinear',
                         align_corners=head.align_corners)
    return sims[0].view(c, k, *sims.shape[-2:]).clamp(-1, 1)


@torch.no_grad()
def collect_embeddings(model: nn.Module,
                       dataset,
                       class_ids: Sequence[int],
                       num_images: int = 20,
                       per_class: int = 300,
                       kind: str = 'auto',
                       seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Subsampled pixel features of chosen classes from a labelled dataset.

    Labels (at whatever size the pipeline loads them) are nearest-resized to
    the feature grid of the unpadded image.

    Args:
        model (nn.Module): Segmentor.
        dataset: MMSeg dataset whose items carry ``gt_sem_seg``.
        class_ids (Sequence[int]): Classes to keep.
        num_images (int): Use the first ``num_images`` items. Default: 20.
        per_class (int): Keep at most this many random pixels per class.
            Default: 300.
        kind (str): See :func:`pixel_features`. Default: 'auto'.
        seed (int): Subsampling seed. Default: 0.

    Returns:
        tuple[Tensor, Tensor]: features (N, D) and their class ids (N,).
    """
    if len(dataset) == 0:
        raise ValueError('The dataset is empty: check its data_root')
    feats, labels = [], []
    for i in range(min(num_images, len(dataset))):
        item = dataset[i]
        sample = item['data_samples']
        if 'gt_sem_seg' not in sample:
            raise ValueError('The dataset pipeline loads no annotations '
                             '(LoadAnnotations); labels are needed to pick '
                             'the pixels of each class')
        data = model.data_preprocessor(
            dict(inputs=[item['inputs']], data_samples=[sample]), False)
        inputs = data['inputs']
        emb = pixel_features(model, inputs, kind)[0]
        fh, fw = _valid_grid(emb.shape[:2], inputs.shape[-2:],
                             data['data_samples'][0].img_shape[:2])
        emb = emb[:fh, :fw]
        gt = sample.gt_sem_seg.data.float()[None]
        lab = F.interpolate(gt, size=(fh, fw), mode='nearest').long()
        feats.append(emb.reshape(-1, emb.shape[-1]).float())
        labels.append(lab.view(-1))
    feats_all, labels_all = torch.cat(feats), torch.cat(labels)
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in class_ids:
        idx = torch.nonzero(labels_all == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    keep_idx = torch.cat(keep)
    if len(keep_idx) == 0:
        raise ValueError('None of the chosen classes occurs in the first '
                         f'{num_images} images; choose other --classes or '
                         'more --num-images')
    return feats_all[keep_idx], labels_all[keep_idx]


def pca_2d(points: Tensor, extra: Optional[Tensor] = None
           ) -> Tuple[Tensor, Optional[Tensor]]:
    """Project onto the top two principal axes of ``points`` (torch SVD).

    Args:
        points (Tensor): (N, D) points the axes are fitted on.
        extra (Tensor, optional): (M, D) points projected on the same axes
            (e.g. prototypes).

    Returns:
        tuple[Tensor, Tensor | None]: (N, 2) and (M, 2) coordinates.
    """
    points = points.double()
    mean = points.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(points - mean, full_matrices=False)
    axes = vh[:2].T
    if axes.shape[1] < 2:  # D == 1: pad with a zero axis
        axes = torch.cat([axes, torch.zeros_like(axes)], dim=1)
    proj = (points - mean) @ axes
    if extra is None:
        return proj.float(), None
    return proj.float(), ((extra.double() - mean) @ axes).float()


def tsne_2d(points: Tensor, extra: Optional[Tensor] = None, seed: int = 0,
            perplexity: float = 30.0) -> Tuple[Tensor, Optional[Tensor]]:
    """t-SNE of ``points`` and ``extra`` fitted jointly (scikit-learn).

    t-SNE has no out-of-sample projection, so prototypes are part of the fit.

    Raises:
        ImportError: if scikit-learn is not installed.
    """
    try:
        from sklearn.manifold import TSNE
    except ImportError as err:
        raise ImportError(
            "--method tsne needs scikit-learn: pip install scikit-learn (or "
            "pip install -e '.[vis]'), or use --method pca") from err
    allp = points if extra is None else torch.cat([points, extra])
    n = len(allp)
    if n < 3:
        raise ValueError(f't-SNE needs at least 3 points, got {n}')
    perplexity = min(perplexity, (n - 1) / 3.0)
    out = TSNE(n_components=2, perplexity=perplexity, init='pca',
               random_state=seed).fit_transform(allp.double().numpy())
    out = torch.from_numpy(out).float()
    if extra is None:
        return out, None
    return out[:len(points)], out[len(points):]


def reduce_2d(points: Tensor, extra: Optional[Tensor] = None,
              method: str = 'pca',
              seed: int = 0) -> Tuple[Tensor, Optional[Tensor]]:
    """2-D coordinates of ``points`` (and ``extra``) by 'pca' or 'tsne'."""
    if method == 'pca':
        return pca_2d(points, extra)
    if method == 'tsne':
        return tsne_2d(points, extra, seed=seed)
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
