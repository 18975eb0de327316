"""The support of a new class: its images and masks read and checked
(:func:`read_support`), then their features at the decoder's resolution through the
model's own test pipeline, with the masks resized as training resizes labels
(:func:`support_features`)."""
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .add_class_checks import AddClassError, is_int
from .head_adapters import HeadAdapter

ImageLike = Union[str, np.ndarray]
Support = Sequence[Tuple[ImageLike, ImageLike]]


def read_support(image: ImageLike, mask: ImageLike,
                 mask_value: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray,
                                                            np.ndarray]:
    """An image (BGR, as ``LoadImageFromFile`` gives it) and two boolean maps of its size:
    the class's pixels and the pixels that are known not to be the class.

    Args:
        image (str | ndarray): Path or BGR array.
        mask (str | ndarray): A binary mask (0 / nonzero, e.g. 0 / 255) or, with
            ``mask_value``, a label map holding the class as ``mask_value`` (255 there is
            void: neither the class nor known not to be).
        mask_value (int, optional): The class's value in a label map.
    """
    img = _read(image, 'color', 'image')
    m = _read(mask, 'unchanged', 'mask')
    name = mask if isinstance(mask, str) else 'the mask'
    if m.ndim == 3 and m.shape[2] in (2, 4):  # an alpha channel: no label, if constant
        if not (m[..., -1] == m[..., -1].flat[0]).all():
            raise AddClassError(f'{name}: a mask with a varying alpha channel (transparency); '
                                'give a single-channel binary mask or label map (alpha is '
                                'not read as the class)')
        m = m[..., :-1]
    if m.ndim == 3:
        if not all(np.array_equal(m[..., 0], m[..., i]) for i in range(1, m.shape[2])):
            raise AddClassError(f'{name}: a colour mask; give a single-channel binary mask '
                                'or label map')
        m = m[..., 0]
    if m.shape != img.shape[:2]:
        raise AddClassError(f'{name} is {m.shape[1]}x{m.shape[0]} but its image '
                            f'{image if isinstance(image, str) else ""} is '
                            f'{img.shape[1]}x{img.shape[0]}: they must be the same size')
    if mask_value is None:
        values = set(np.unique(m).tolist())
        if len(values - {0}) > 1:
            lossy = isinstance(mask, str) and mask.lower().endswith(('.jpg', '.jpeg'))
            raise AddClassError(f'{name} holds values {sorted(values)[:8]}: a binary mask has '
                                '0 and one other value; for a label map give the class value '
                                '(mask_value / --mask-value)'
                                + ('; JPEG is lossy: save masks as PNG' if lossy else ''))
        positive, known = m > 0, np.ones(m.shape, bool)
    else:
        positive, known = m == mask_value, m != 255
    if not positive.any():
        raise AddClassError(f'{name} holds no pixel of the class'
                            + ('' if mask_value is None else f' (value {mask_value})'))
    return img, positive, known


def _read(source: ImageLike, flag: str, what: str) -> np.ndarray:
    import mmcv
    if isinstance(source, np.ndarray):
        return _check_array(source, flag, what)
    try:
        data = mmcv.imread(source, flag=flag, channel_order='bgr', backend='cv2')
    except Exception as err:  # mmcv raises FileNotFoundError, TypeError, ...
        raise AddClassError(f'cannot read the {what} {source!r}: {err}') from None
    if data is None:
        raise AddClassError(f'cannot read the {what} {source!r}: not an image')
    return data


def _check_array(data: np.ndarray, flag: str, what: str) -> np.ndarray:
    """An image or mask given as an array, as reading a file with ``flag`` gives it: a
    colour image has 3 BGR channels (a grayscale one is repeated, an alpha channel dropped,
    as ``LoadImageFromFile`` does); values must be finite.

    Raises:
        AddClassError: Another shape, or NaN / inf values.
    """
    if data.ndim not in (2, 3) or data.size == 0 or (
            data.ndim == 3 and data.shape[2] not in (1, 2, 3, 4)):
        raise AddClassError(f'the {what} array has shape {data.shape}: give (H, W) or '
                            '(H, W, 1 / 3 / 4 channels)')
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise AddClassError(f'the {what} array holds NaN or inf values: give finite values')
    if flag == 'color':
        if data.ndim == 2:
            data = data[..., None]
        if data.shape[2] in (2, 4):  # grayscale + alpha, BGRA: the alpha is not read
            data = data[..., :-1]
        if data.shape[2] == 1:
            data = np.repeat(data, 3, axis=2)
    return data


def inference_windows(model: nn.Module, height: int,
                      width: int) -> List[Tuple[int, int, int, int]]:
    """The (y1, y2, x1, x2) windows the model's inference reads of a preprocessed
    ``height`` x ``width`` image: the whole image, or under ``test_cfg.mode='slide'`` the
    windows of MMSeg's ``EncoderDecoder.slide_inference`` (same grid, same clipping)."""
    test_cfg = getattr(model, 'test_cfg', None) or {}
    if test_cfg.get('mode', 'whole') != 'slide':
        return [(0, height, 0, width)]
    try:
        (h_stride, w_stride), (h_crop, w_crop) = test_cfg['stride'], test_cfg['crop_size']
        if not all(is_int(v) and v >= 1 for v in (h_stride, w_stride, h_crop, w_crop)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise AddClassError(
            f"the model's test_cfg {dict(test_cfg)} asks for slide inference: give it "
            'crop_size=(h, w) and stride=(h, w), positive integers, as MMSeg\'s '
            'slide_inference needs') from None
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2, x2 = min(h_idx * h_stride + h_crop, height), min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


@torch.no_grad()
def support_features(model: nn.Module, adapter: HeadAdapter, image: np.ndarray,
                     masks: Sequence[np.ndarray]) -> Tuple[Tensor, List[Tensor]]:
    """(N, D) features of ``image`` through the model's test pipeline, data preprocessor
    and inference windows, and each boolean mask resized as training resizes labels (to
    the preprocessed image, padded with False, then nearest to the decoder's resolution).

    With whole-image inference N = h*w, the decoder's resolution. Under a slide
    ``test_cfg`` the features are those of each window slide inference reads
    (:func:`inference_windows`), one after the other, so that the class is placed and
    calibrated on the features the model predicts from; a pixel in several windows is a
    sample of each.

    Args:
        model (nn.Module): The segmentor (its ``cfg``, ``test_cfg`` and data preprocessor
            are used).
        adapter (HeadAdapter): The adapter of its decode head (:func:`head_adapter`).
        image (ndarray): A BGR image, as :func:`read_support` gives it.
        masks (Sequence[ndarray]): Boolean maps of the image's size.

    Returns:
        tuple[Tensor, list[Tensor]]: The (N, D) features and each mask as (N,) bool.
    """
    import mmcv
    from mmcv.transforms import Compose
    cfg = model.cfg
    steps = cfg.get('test_pipeline') or cfg.test_dataloader.dataset.pipeline
    pipeline = [dict(t) for t in steps if t['type'] != 'LoadAnnotations']
    pipeline[0] = dict(type='LoadImageFromNDArray')
    data = Compose(pipeline)(dict(img=image))
    batch = model.data_preprocessor(dict(inputs=[data['inputs']],
                                         data_samples=[data['data_samples']]), False)
    inputs = batch['inputs']
    h_img, w_img = batch['data_samples'][0].img_shape[:2]
    full_masks = []
    for mask in masks:
        m = mmcv.imresize(mask.astype(np.uint8), (w_img, h_img), interpolation='nearest')
        full = torch.zeros(inputs.shape[-2:], dtype=torch.float32)
        full[:h_img, :w_img] = torch.from_numpy(m).float()
        full_masks.append(full)
    feats, resized = [], [[] for _ in masks]
    for y1, y2, x1, x2 in inference_windows(model, *inputs.shape[-2:]):
        window = adapter.features(model, inputs[:, :, y1:y2, x1:x2])[0]  # (h, w, D)
        feats.append(window.reshape(-1, window.shape[-1]))
        for full, out in zip(full_masks, resized):
            small = F.interpolate(full[None, None, y1:y2, x1:x2], size=window.shape[:2],
                                  mode='nearest')
            out.append(small.view(-1).bool().to(window.device))
    return torch.cat(feats), [torch.cat(m) for m in resized]
