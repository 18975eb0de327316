"""Explain one pixel of a ProtoSeg prediction by its prototypes' training pixels.

For IMAGE and pixel (Y, X) (original-image coordinates), writes the predicted class and its
score, the class's prototype nearest to the pixel with its cosine similarity, the runner-up
classes' nearest prototypes and similarities, and each of these prototypes' gallery crops
(the training pixels it stands for: "this looks like that"). The gallery is the
``gallery.json`` of ``tools/analysis_tools/prototype_report.py`` for the same checkpoint.
``--out`` ending in ``.png`` writes a figure, ``.html`` a static page (images in
``<name>_files/`` next to it).

    python tools/analysis_tools/explain_pixel.py CONFIG CHECKPOINT IMAGE --pixel Y X
        --gallery DIR/gallery.json --out FILE.png|FILE.html [--runners-up 2]
"""
import argparse
import os
import os.path as osp
import sys
from typing import Optional, Sequence, Tuple

import numpy as np

TITLE, ROW, BOTTOM = 0.3, 1.3, 0.1  # inches: room for the top titles, a gallery row, margin


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring); exits with a message on bad values.

    Args:
        argv (Sequence[str], optional): Arguments without the program name.
            Default: ``sys.argv[1:]``.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='ProtoSeg config file')
    p.add_argument('checkpoint', help='checkpoint file (the one the gallery was built from)')
    p.add_argument('image', help='image file')
    p.add_argument('--pixel', type=int, nargs=2, required=True, metavar=('Y', 'X'),
                   help='row and column of the pixel in the original image')
    p.add_argument('--gallery', required=True,
                   help='gallery.json written by tools/analysis_tools/prototype_report.py')
    p.add_argument('--out', required=True, help='FILE.png (figure) or FILE.html (page)')
    p.add_argument('--runners-up', type=int, default=2, metavar='N',
                   help='runner-up classes shown, >= 0 (default: 2)')
    p.add_argument('--crop-size', type=int, default=64, metavar='PX',
                   help='side of the crop around the pixel (default: 64)')
    p.add_argument('--dpi', type=int, default=100, help='PNG resolution (default: 100)')
    p.add_argument('--png-colors', type=int, default=0,
                   help='save an 8-bit palette PNG with at most this many colours '
                        '(2-256; smaller files, e.g. for docs); 0 keeps RGB (default: 0)')
    p.add_argument('--device', default='cpu', help="e.g. 'cpu', 'cuda' (default: cpu)")
    args = p.parse_args(argv)
    args.out_folder = check_out(p, args)  # first: never over an input or a file not ours
    for name in ('config', 'checkpoint', 'image', 'gallery'):
        if not osp.isfile(getattr(args, name)):
            p.error(f'no such {name} file: {getattr(args, name)}' + (
                ' (write one with tools/analysis_tools/prototype_report.py CONFIG '
                'CHECKPOINT --out DIR)' if name == 'gallery' else ''))
    ext = osp.splitext(args.out)[1].lower()
    if ext not in ('.png', '.html'):
        p.error(f'--out {args.out}: give a .png (figure) or .html (page) file name')
    if osp.isdir(args.out):
        p.error(f'--out {args.out} is a folder; give a .png or .html file name')
    if args.runners_up < 0 or args.crop_size < 1 or args.dpi < 1:
        p.error('--runners-up must be >= 0, --crop-size and --dpi >= 1')
    if args.png_colors and not 2 <= args.png_colors <= 256:
        p.error('--png-colors must be 0 or in [2, 256]')
    from mmseg_proto.visualization.pixel_explanation import check_pixel, image_size
    try:  # the size the model sees (EXIF orientation applied, as LoadImageFromFile does)
        shape = image_size(args.image)
    except ValueError as err:
        p.error(f'image: {err}')
    try:
        check_pixel(args.pixel, shape)
    except ValueError as err:
        p.error(f'--pixel: {err}')
    return args


def check_out(p: argparse.ArgumentParser, args: argparse.Namespace):
    """The folder of ``--out``, checked by the package's output policy (exits on refusal).

    ``--out`` is never an input (config, checkpoint, image, gallery), under any spelling or
    link; an existing file there, or in ``<stem>_files/`` of a page, is replaced only if
    explain_pixel wrote it (:mod:`mmseg_proto.utils.output_files`).

    Args:
        p (argparse.ArgumentParser): For the error message.
        args (argparse.Namespace): The parsed command line.

    Returns:
        OutputFolder: The folder of ``--out``, to write the files with.
    """
    from mmseg_proto.utils.output_files import (OutputFolder, OutputPathError,
                                                check_output_file)
    inputs = dict(config=args.config, checkpoint=args.checkpoint, image=args.image,
                  gallery=args.gallery)
    try:
        folder = check_output_file(args.out, 'explain_pixel', inputs)
        if args.out.lower().endswith('.html'):
            stem = osp.splitext(osp.basename(args.out))[0]
            folder = OutputFolder(osp.dirname(args.out), 'explain_pixel')
            folder.check(inputs, names=[osp.basename(args.out)],
                         subfolders=[f'{stem}_files'], shown=args.out)
    except OutputPathError as err:
        p.error(str(err))
    return folder


def figure_size(per_prototype: int, rows: int, aspect: float) -> Tuple[float, float, int]:
    """(width, height) in inches and the number of grid columns of the figure.

    Args:
        per_prototype (int): Gallery crops per row (N).
        rows (int): Classes shown (predicted + runners-up).
        aspect (float): Image height / width.
    """
    cols = max(per_prototype, 6) + 1
    header = max(2.0, 4 * aspect) + TITLE
    return float(cols), header + ROW * rows + BOTTOM, cols


def plot_explanation(expl, image: np.ndarray, out_file: str, crop_size: int = 64,
                     dpi: int = 100) -> None:
    """Draw a :class:`PixelExplanation` to a PNG.

    Top: the image with the pixel marked, the crop around it and the verdict. Then one row
    per class (predicted first): its nearest prototype, cosine, score and use, and the
    prototype's gallery crops with their cosines.

    Args:
        expl (PixelExplanation): From ``explain_pixel``.
        image (np.ndarray): RGB image.
        out_file (str): PNG file.
        crop_size (int): Side of the crop around the pixel. Default: 64.
        dpi (int): Resolution. Default: 100.
    """
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    from mmseg_proto.visualization.image_crops import crop_around, read_rgb

    classes = [expl.predicted] + list(expl.runners_up)
    n = max([len(ev.gallery) for ev in classes] + [1])
    h, w = image.shape[:2]
    width, height, cols = figure_size(n, len(classes), h / w)
    header = height - ROW * len(classes) - BOTTOM - TITLE
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    grid = fig.add_gridspec(1 + len(classes), cols, height_ratios=[header] + [ROW] * len(
        classes), left=0.01, right=0.99, top=1 - TITLE / height, bottom=BOTTOM / height,
        wspace=0.08, hspace=0.3)
    y, x = expl.pixel
    ax = fig.add_subplot(grid[0, :4])
    ax.imshow(image)
    ax.add_patch(Circle((x, y), radius=max(h, w) / 60, fill=False, color='yellow', lw=2))
    ax.add_patch(Circle((x, y), radius=max(h, w) / 60 + 2, fill=False, color='black', lw=1))
    ax.set_title(f'{osp.basename(str(expl.image))}  pixel (y {y}, x {x})', fontsize=8)
    ax.axis('off')
    ax = fig.add_subplot(grid[0, 4:6])
    ax.imshow(crop_around(image, y, x, crop_size))
    ax.set_title(f'{crop_size}x{crop_size} around it', fontsize=8)
    ax.axis('off')
    p = expl.predicted
    lines = [f'Predicted: {p.class_name}  (score {p.score:.2f})',
             f'nearest {p.class_name} prototype: #{p.prototype}',
             f'cosine similarity {p.similarity:.3f}', '']
    for ev in expl.runners_up:
        lines.append(f'runner-up {ev.class_name} (score {ev.score:.2f}):')
        lines.append(f'   #{ev.prototype}, cosine {ev.similarity:.3f}')
    lines += ['', 'Rows: each prototype\'s most similar', 'training pixels (gallery).']
    ax = fig.add_subplot(grid[0, 6:])
    ax.axis('off')
    ax.text(0.0, 1.0, '\n'.join(lines), va='top', ha='left', fontsize=8, family='monospace',
            transform=ax.transAxes)
    for row, ev in enumerate(classes, start=1):
        ax = fig.add_subplot(grid[row, 0])
        ax.axis('off')
        role = 'predicted' if row == 1 else f'runner-up {row - 1}'
        share = '-' if ev.use_share is None else f'{100 * ev.use_share:.0f}%'
        ax.text(0.0, 0.5, f'{role}\n{ev.class_name} #{ev.prototype}\ncos {ev.similarity:.3f}\n'
                f'score {ev.score:.2f}\nuse {share}', va='center', ha='left', fontsize=7,
                transform=ax.transAxes, fontweight='bold' if row == 1 else 'normal')
        for j, e in enumerate(ev.gallery[:cols - 1]):
            ax = fig.add_subplot(grid[row, j + 1])
            ax.imshow(read_rgb(e['crop']))
            ax.set_title(f"{e['similarity']:.2f}", fontsize=7, pad=2)
            ax.axis('off')
        if not ev.gallery:
            ax = fig.add_subplot(grid[row, 1:])
            ax.axis('off')
            ax.text(0.0, 0.5, 'no training pixel is filed under this prototype (dead)',
                    fontsize=7, va='center', transform=ax.transAxes)
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=dpi)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None):
    """Explain the pixel and write the figure or page.

    Args:
        argv (Sequence[str], optional): Arguments without the program name.

    Returns:
        PixelExplanation: What was drawn.
    """
    args = parse_args(argv)
    import mmseg_proto  # noqa: F401  (registers the plugin modules)
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    from mmseg_proto.visualization.image_crops import read_rgb
    from mmseg_proto.visualization.pixel_explanation import (explain_pixel,
                                                             write_explanation_html)
    from mmseg_proto.visualization.prototype_gallery import load_gallery
    from mmseg_proto.visualization.prototypes import load_model, proto_head
    with mmseg_proto_config_scope():  # the config may inherit mmseg_proto::
        try:
            model = load_model(args.config, args.checkpoint, args.device)
            proto_head(model)
            gallery = load_gallery(args.gallery)
            expl = explain_pixel(model, args.image, args.pixel, gallery, args.runners_up)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SystemExit(f'explain_pixel: {err}') from err
    image = read_rgb(args.image)
    name = osp.basename(args.out)
    if args.out.lower().endswith('.html'):  # the page and <stem>_files/, moved in at once
        with args.out_folder.staged() as staging:
            write_explanation_html(expl, osp.join(staging, name), image, args.crop_size)
            args.out_folder.commit(staging, [f'{osp.splitext(name)[0]}_files'])
    else:
        with args.out_folder.atomic(name) as tmp:
            plot_explanation(expl, image, tmp, args.crop_size, args.dpi)
            if args.png_colors:
                from PIL import Image
                with Image.open(tmp) as img:
                    small = img.convert('RGB').quantize(colors=args.png_colors,
                                                        method=Image.Quantize.MAXCOVERAGE)
                small.save(tmp, optimize=True)
    p = expl.predicted
    print(f'explain_pixel: ({args.pixel[0]}, {args.pixel[1]}) -> {p.class_name} '
          f'(score {p.score:.3f}), prototype #{p.prototype} cosine {p.similarity:.3f}; '
          + '; '.join(f'runner-up {e.class_name} #{e.prototype} cosine {e.similarity:.3f}'
                      for e in expl.runners_up))
    print(f'explain_pixel: wrote {args.out}')
    return expl


if __name__ == '__main__':
    main(sys.argv[1:])
