"""Explaining one pixel by its nearest prototypes and their gallery pixels ("this looks like
that"), used by ``tools/analysis_tools/explain_pixel.py``."""
import html
import os
import os.path as osp
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import numpy as np
import torch
import torch.nn as nn

from .image_crops import crop_around, draw_marker, read_rgb, write_png
from .prototype_gallery import (check_gallery, load_gallery, prototype_fingerprint,
                                prototype_record, resolve_crop)
from .prototype_report_page import REPORT_CSS
from .prototypes import ImageType, preprocess_image, proto_head, prototype_similarity

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
        untrained (bool, optional): Training never moved the prototype from its random
            initialisation (None: not known; see ``untrained_prototypes``).
    """
    class_id: int
    class_name: str
    score: float
    prototype: int
    similarity: float
    gallery: List[Dict[str, Any]]
    pixels: int = 0
    use_share: Optional[float] = None
    untrained: Optional[bool] = None


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
    """Raise ValueError unless ``gallery`` (checked by
    :func:`~.prototype_gallery.check_gallery`) was built with ``model``'s prototypes."""
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
    """Prototype ``k`` of class ``c``'s gallery pixels, crops resolved inside the gallery's
    folder (ValueError if one is outside it or missing), and its record."""
    record = prototype_record(gallery, c, k)
    root = gallery['root']
    rows = []
    for e in record['top']:
        try:
            crop = resolve_crop(root, e['crop'])
        except ValueError as err:
            raise ValueError(f"The gallery's crop of class {c} prototype {k}: {err}") from None
        if not osp.isfile(crop):
            raise ValueError(f"The gallery's crop {e['crop']} of class {c} prototype {k} is "
                             f'missing from {root}: copy the whole report folder, or rebuild '
                             'it with tools/analysis_tools/prototype_report.py')
        rows.append(dict(image_path=gallery['images'][e['image']]['path'], y=e['y'],
                         x=e['x'], similarity=e['similarity'], crop=crop))
    return rows, record


def image_size(image: ImageType) -> Tuple[int, int]:
    """(H, W) of an image file or array, as the model sees it.

    A file is decoded as the default ``LoadImageFromFile`` decodes it (``mmcv.imfrombytes``,
    ``color``), so a JPEG with an EXIF orientation (a phone photo) has its rotated size.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if it cannot be read as an image.
    """
    if isinstance(image, np.ndarray):
        return int(image.shape[0]), int(image.shape[1])
    if not osp.isfile(str(image)):
        raise FileNotFoundError(f'No such image: {image}')
    try:
        img = read_rgb(str(image))
    except FileNotFoundError:
        raise ValueError(f'Cannot read {image} as an image') from None
    return int(img.shape[0]), int(img.shape[1])


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
    if isinstance(gallery, str):
        gallery = load_gallery(gallery)
    else:
        check_gallery(gallery)
    check_gallery_model(gallery, model)
    head = proto_head(model)
    data = preprocess_image(model, image)
    # The pixel is checked against the image the model sees (EXIF orientation applied).
    y, x = check_pixel(pixel, tuple(data['data_samples'][0].ori_shape[:2]))
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
            pixels=record['pixels'], use_share=record['use_share'],
            untrained=record.get('untrained')))
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

    def url(name: str) -> str:  # relative link to a file in <stem>_files/, URL-escaped
        return esc(quote(f'{stem}_files/{name}'))

    os.makedirs(files, exist_ok=True)
    if image is None:
        image = read_rgb(explanation.image)
    y, x = explanation.pixel
    write_png(osp.join(files, 'image.png'), draw_marker(image.copy(), y, x, radius=5))
    write_png(osp.join(files, 'query.png'), crop_around(image, y, x, crop_size))
    p = explanation.predicted
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Why '
             f'{esc(p.class_name)}?</title><style>{REPORT_CSS}</style></head><body>',
             f'<h1>Pixel (y {y}, x {x}): {esc(p.class_name)}</h1>',
             f'<p class="meta">{esc(str(explanation.image))}</p>',
             f'<p><img src="{url("image.png")}" alt="image" style="max-width:480px">'
             f' <img src="{url("query.png")}" alt="pixel" width="128" height="128"></p>',
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
            crops.append(f'<figure><img class="crop" src="{url(name)}" alt="{esc(tip)}"'
                         f' title="{esc(tip)}"><figcaption>{e["similarity"]:.2f}</figcaption>'
                         '</figure>')
        untrained = (' <span class="flag dead">never trained: a random prototype</span>'
                     if ev.untrained else '')
        parts.append(f'<tr class="evidence" data-rank="{rank}"><td>{esc(ev.class_name)}</td>'
                     f'<td class="num">{ev.score:.3f}</td><td>#{ev.prototype}{untrained}</td>'
                     f'<td class="num">{ev.similarity:.3f}</td>'
                     f'<td class="crops">{"".join(crops)}</td></tr>')
    parts.append('</tbody></table></body></html>\n')
    with open(out_file, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts))
    return out_file
