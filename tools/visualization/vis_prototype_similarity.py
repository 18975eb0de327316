"""Pixel-prototype similarity maps of a ProtoSeg model (paper Fig. 3).

For every image, writes ``OUT_DIR/<image name>_proto_sim.png``: the image and
the prediction overlay (drawn by MMSeg's ``SegLocalVisualizer`` with the
dataset palette) on the left, and for each chosen class one row of K panels,
the cosine similarity of every pixel to each of the class's K prototypes.
A panel's title gives the share of the pixels predicted as that class whose
nearest prototype (of the class) it is.

Example::

    python tools/visualization/vis_prototype_similarity.py \\
        configs/protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py \\
        work_dirs/demo/.../iter_80.pth data/camvid_mini/img_dir/val/0001TP_008550.jpg \\
        --classes road car --out-dir work_dirs/vis
"""
import argparse
import os.path as osp
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

LEFT_MIN = 1.0  # width of the image column, in panels (at least)
CBAR = 0.1  # width of the colour-bar column, in panels
RIGHT = 0.55  # room right of the colour bar for its labels, inches
TOP, BOTTOM = 0.2, 0.6  # margins (titles; the legend), inches


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Plot pixel-prototype similarity maps of a ProtoSeg '
        'model (one panel per prototype of each chosen class).')
    parser.add_argument('config', help='ProtoSeg model config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('images', nargs='+', metavar='IMG',
                        help='image file(s)')
    parser.add_argument('--classes', nargs='+', default=None,
                        help='class names to show, e.g. road car (default: '
                        'the 3 classes with most predicted pixels)')
    parser.add_argument('--out-dir', required=True,
                        help='folder for the PNGs (created if missing)')
    parser.add_argument('--device', default='cpu', help="e.g. 'cpu', 'cuda'")
    parser.add_argument('--panel-size', type=float, default=1.6,
                        help='width of one prototype panel in inches '
                        '(default: 1.6)')
    parser.add_argument('--dpi', type=int, default=100,
                        help='resolution of the PNG (default: 100)')
    parser.add_argument('--alpha', type=float, default=0.75,
                        help='opacity of the similarity heat map over the '
                        'grey image, 1 hides the image (default: 0.75)')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='opacity of the prediction overlay '
                        '(default: 0.5)')
    parser.add_argument('--cmap', default='jet',
                        help='matplotlib colour map (default: jet)')
    parser.add_argument('--png-colors', type=int, default=0,
                        help='save an 8-bit palette PNG with at most this '
                        'many colours (2-256; much smaller files, e.g. for '
                        'docs); 0 keeps full RGB (default: 0)')
    args = parser.parse_args(argv)
    args.out_folder = check_out(parser, args)  # first: nothing of the user's replaced
    if args.panel_size <= 0 or args.dpi <= 0:
        parser.error('--panel-size and --dpi must be > 0')
    if not 0 <= args.alpha <= 1 or not 0 < args.opacity <= 1:
        parser.error('--alpha must be in [0, 1] and --opacity in (0, 1]')
    if args.png_colors and not 2 <= args.png_colors <= 256:
        parser.error('--png-colors must be 0 or in [2, 256]')
    return args


def out_name(image: str) -> str:
    """The file written in --out-dir for an image."""
    return f'{osp.splitext(osp.basename(image))[0]}_proto_sim.png'


def check_out(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """--out-dir, checked by the package's output policy (exits on refusal).

    Never an input folder; a figure it would write is never an input (image, config,
    checkpoint) and replaces only a file this tool wrote
    (:mod:`mmseg_proto.utils.output_files`). Two images with the same file name would write
    the same figure: refused.

    Returns:
        OutputFolder: The folder, to write the figures with.
    """
    from mmseg_proto.utils.output_files import OutputFolder, OutputPathError
    names = [out_name(path) for path in args.images]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        parser.error(f'two images would both write {twice[0]} in --out-dir: give images '
                     'with different file names')
    folder = OutputFolder(args.out_dir, 'vis_prototype_similarity', '--out-dir')
    try:
        folder.check(dict(config=args.config, checkpoint=args.checkpoint,
                          image=args.images), names=names)
    except OutputPathError as err:
        parser.error(str(err))
    return folder


def figure_size(num_classes: int, num_prototypes: int, panel: float,
                aspect: float) -> Tuple[float, float, float]:
    """Figure (width, height) in inches and the image column's width.

    Args:
        num_classes (int): Rows of prototype panels (classes shown).
        num_prototypes (int): Panels per row (K).
        panel (float): Panel width in inches.
        aspect (float): Image height / width.

    Returns:
        tuple[float, float, float]: width, height, image-column width (all
        in inches). The image and the overlay stack in the left column, so
        it is as wide as half the rows are tall.
    """
    rows = max(2, num_classes)
    left = max(LEFT_MIN, rows / 2.0) * panel
    title = 0.25  # room for a panel title, inches
    height = rows * (panel * aspect + title) + TOP + BOTTOM
    width = left + (num_prototypes + CBAR) * panel + RIGHT + 0.2
    return width, height, left


def quantize_png(path: str, colors: int) -> None:
    """Rewrite a PNG as an optimised palette image of ``colors`` colours."""
    from PIL import Image
    with Image.open(path) as img:
        small = img.convert('RGB').quantize(colors=colors)
    small.save(path, optimize=True)


def overlay_prediction(image_rgb: np.ndarray, result, meta: dict,
                       opacity: float) -> np.ndarray:
    """Prediction drawn on the image by MMSeg's SegLocalVisualizer."""
    from mmseg.visualization import SegLocalVisualizer
    vis = SegLocalVisualizer.get_instance(
        'vis_prototype_similarity', alpha=opacity)
    vis.dataset_meta = dict(classes=meta['classes'], palette=meta['palette'])
    vis.add_datasample('prediction', image_rgb, data_sample=result,
                       draw_gt=False, draw_pred=True, show=False,
                       with_labels=False)
    return vis.get_image()


def plot_image(path: str, out_file: str, model, class_names: Optional[
        Sequence[str]], args: argparse.Namespace) -> List[str]:
    """Write the figure for one image; returns the classes shown."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import mmcv
    import torch
    from matplotlib.patches import Patch
    from mmseg.apis import inference_model

    from mmseg_proto.visualization import (class_indices,
                                           prototype_similarity)

    meta = model.dataset_meta
    classes, palette = meta['classes'], meta['palette']
    image = mmcv.imread(path, channel_order='rgb')
    result = inference_model(model, path)
    pred = result.pred_sem_seg.data[0].cpu()
    sims = prototype_similarity(model, path).cpu()  # (C, K, H, W)
    if class_names:
        ids = class_indices(class_names, classes)
    else:
        counts = torch.bincount(pred.flatten(), minlength=len(classes))
        ids = [int(i) for i in counts.argsort(descending=True)[:3]
               if counts[i] > 0]
    k = sims.shape[1]
    shown = sims[ids]
    vmin, vmax = float(shown.min()), float(shown.max())
    if vmax - vmin < 1e-6:
        vmax = vmin + 1e-6
    grey = image.mean(axis=2)
    aspect = image.shape[0] / image.shape[1]
    width, height, left = figure_size(len(ids), k, args.panel_size, aspect)
    rows = max(2, len(ids))
    fig = plt.figure(figsize=(width, height), dpi=args.dpi)
    grid = fig.add_gridspec(
        rows, k + 2, width_ratios=[left / args.panel_size] + [1] * k + [CBAR],
        left=0.005, right=1 - RIGHT / width, top=1 - TOP / height,
        bottom=BOTTOM / height,
        wspace=0.05, hspace=0.3)
    left_col = grid[:, 0].subgridspec(2, 1, hspace=0.25)
    ax = fig.add_subplot(left_col[0])
    ax.imshow(image)
    ax.set_title(osp.basename(path), fontsize=7)
    ax.axis('off')
    ax = fig.add_subplot(left_col[1])
    ax.imshow(overlay_prediction(image, result, meta, args.opacity))
    ax.set_title('prediction', fontsize=7)
    ax.axis('off')
    present = torch.unique(pred).tolist()
    handles = [Patch(color=np.array(palette[i]) / 255.0, label=classes[i])
               for i in present if i < len(classes)]
    ax.legend(handles=handles, loc='upper center', fontsize=5, ncol=3,
              bbox_to_anchor=(0.5, 0.0), frameon=False, handlelength=1)

    heat = None
    for row, c in enumerate(ids):
        nearest = sims[c].argmax(dim=0)[pred == c]
        share = torch.bincount(nearest, minlength=k).float() / max(
            1, nearest.numel())
        for j in range(k):
            ax = fig.add_subplot(grid[row, j + 1])
            ax.imshow(grey, cmap='gray')
            heat = ax.imshow(sims[c, j].numpy(), cmap=args.cmap, vmin=vmin,
                             vmax=vmax, alpha=args.alpha)
            ax.set_title(f'{classes[c]} #{j}  {100 * share[j]:.0f}%',
                         fontsize=6, pad=2)
            ax.axis('off')
    cax = fig.add_subplot(grid[:, -1])
    cbar = fig.colorbar(heat, cax=cax)
    cbar.ax.tick_params(labelsize=6)
    cbar.set_label('cosine similarity', fontsize=7)
    with args.out_folder.atomic(osp.basename(out_file)) as tmp:
        fig.savefig(tmp, dpi=args.dpi)
        plt.close(fig)
        if args.png_colors:
            quantize_png(tmp, args.png_colors)
    return [classes[c] for c in ids]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for path in [args.config, args.checkpoint, *args.images]:
        if not osp.isfile(path):
            print(f'error: no such file: {path}', file=sys.stderr)
            return 2
    import mmseg_proto  # noqa: F401
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    from mmseg_proto.visualization import load_model, proto_head
    with mmseg_proto_config_scope():  # the config may inherit mmseg_proto::
        model = load_model(args.config, args.checkpoint, device=args.device)
    proto_head(model)  # fail early on a parametric model
    for path in args.images:
        out_file = osp.join(args.out_dir, out_name(path))
        shown = plot_image(path, out_file, model, args.classes, args)
        print(f'{out_file}: classes {", ".join(shown)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
