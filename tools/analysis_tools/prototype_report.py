"""Prototype report: the training pixels every prototype of a ProtoSeg checkpoint stands for.

One inference pass over a split (default: the config's train_dataloader dataset, loaded with
the config's *test* pipeline, so resized but not randomly cropped, flipped or jittered) files
every labelled pixel under its class's prototype nearest to it. Writes to DIR:

- ``gallery.json``: per prototype its use share, pixel count, mean cosine, dead and
  near-duplicate flags and its N most similar pixels (image, position in original-image
  coordinates, cosine, crop file);
- ``crops/*.png``: a square crop around each kept pixel, the pixel marked at the centre;
- ``index.html``: a static page (health figures per class, then one row per prototype, most
  used first, with its crops) that opens from disk, no server needed.

    python tools/analysis_tools/prototype_report.py CONFIG CHECKPOINT --out DIR
        [--split train] [--per-prototype 8] [--per-image 0] [--num-images N]
        [--duplicate-cosine 0.95] [--crop-size 64] [--device cpu]

The config may inherit ours through ``mmseg_proto::``. See docs/prototype_report.md.
"""
import argparse
import os.path as osp
import sys
import time
from typing import Any, Dict, Optional, Sequence


# What the report writes in --out (as mmseg_proto.visualization writes them).
GALLERY, PAGE, CROPS = 'gallery.json', 'index.html', 'crops'


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'got {value}, must be >= 1')
    return value


def cosine(text: str) -> float:
    """argparse type: a cosine threshold in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'got {value}, a cosine must be in [-1, 1]')
    return value


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring); exits with a message on bad values.

    Args:
        argv (Sequence[str], optional): Arguments without the program name.
            Default: ``sys.argv[1:]``.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config', help='ProtoSeg config file')
    p.add_argument('checkpoint', help='checkpoint file')
    p.add_argument('--out', required=True, metavar='DIR',
                   help='output folder (created; a new or empty one, or one where this '
                        'tool wrote a report: only that report\'s files are replaced)')
    p.add_argument('--split', choices=('train', 'val', 'test'), default='train',
                   help="which dataloader's dataset of the config, always with the test "
                        'pipeline (default: train)')
    p.add_argument('--per-prototype', type=positive_int, default=8, metavar='N',
                   help='pixels (crops) kept per prototype, N >= 1 (default: 8)')
    p.add_argument('--per-image', type=int, default=0, metavar='M',
                   help='keep at most M pixels of one image per prototype (its most similar '
                        'ones), for a more varied gallery; 0: no limit (default: 0)')
    p.add_argument('--num-images', type=positive_int, default=None, metavar='N',
                   help='use the first N images of the split, N >= 1 (default: all)')
    p.add_argument('--duplicate-cosine', type=cosine, default=0.95, metavar='COS',
                   help='flag two prototypes as near-duplicates above this cosine '
                        '(default: 0.95)')
    p.add_argument('--crop-size', type=positive_int, default=64, metavar='PX',
                   help='side of the crops, in original-image pixels (default: 64)')
    p.add_argument('--device', default='cpu', help="e.g. 'cpu', 'cuda' (default: cpu)")
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    args = p.parse_args(argv)
    if args.per_image < 0:
        p.error(f'argument --per-image: got {args.per_image}, must be >= 0 (0: no limit)')
    for name in ('config', 'checkpoint'):
        if not osp.isfile(getattr(args, name)):
            p.error(f'no such {name} file: {getattr(args, name)}')
    if osp.lexists(args.out) and not osp.isdir(args.out):
        p.error(f'--out {args.out} is a file; give a folder (it will hold index.html, '
                'gallery.json and crops/)')
    args.out_folder = check_out(p, args)
    return args


def check_out(p: argparse.ArgumentParser, args: argparse.Namespace):
    """The report folder, checked by the package's output policy (exits on refusal).

    The folder is the report's own: a new or empty folder, or one where this tool wrote a
    report (listed in its manifest, :mod:`mmseg_proto.utils.output_files`). Only the files
    the earlier report wrote there are replaced (``gallery.json``, ``index.html``,
    ``crops/*``); a file of these names the tool did not write, or an input, is refused.

    Args:
        p (argparse.ArgumentParser): For the error message.
        args (argparse.Namespace): The parsed command line.

    Returns:
        OutputFolder: The report folder, to write the report with.
    """
    from mmseg_proto.utils.output_files import OutputFolder, OutputPathError
    folder = OutputFolder(args.out, 'prototype_report')
    try:
        folder.check(dict(config=args.config, checkpoint=args.checkpoint),
                     names=[GALLERY, PAGE], subfolders=[CROPS], exclusive=True)
    except OutputPathError as err:
        p.error(str(err))
    return folder


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Build the gallery, write DIR/gallery.json, DIR/crops/ and DIR/index.html.

    Args:
        argv (Sequence[str], optional): Arguments without the program name.

    Returns:
        dict: The gallery as written to ``gallery.json``.
    """
    args = parse_args(argv)
    import mmseg_proto  # noqa: F401  (registers the plugin modules)
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    from mmseg_proto.visualization.prototype_gallery import (build_gallery,
                                                             build_split_dataset,
                                                             save_gallery)
    from mmseg_proto.visualization.prototype_report_page import write_report_html
    from mmseg_proto.visualization.prototypes import load_model, proto_head
    with mmseg_proto_config_scope():  # the config may inherit mmseg_proto::
        try:
            model = load_model(args.config, args.checkpoint, args.device)
            proto_head(model)
            dataset = build_split_dataset(model.cfg, args.split)
        except (TypeError, ValueError, RuntimeError) as err:
            raise SystemExit(f'prototype_report: {err}') from err
    if len(dataset) == 0:
        raise SystemExit(f'prototype_report: the {args.split} dataset of {args.config} has no '
                         'images; check its data_root, or choose another --split')
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    print(f'prototype_report: {n} {args.split} images, top {args.per_prototype} pixels per '
          'prototype', flush=True)
    start = time.perf_counter()
    gallery = build_gallery(model, dataset, args.per_prototype, n, args.per_image,
                            progress=not args.no_progress)
    seconds_pass = time.perf_counter() - start
    meta = dict(config=args.config, checkpoint=args.checkpoint, split=args.split,
                pipeline='test', device=args.device, seconds=round(seconds_pass, 2))
    # Written aside in the folder, then moved in file by file (atomic renames): only the
    # files of an earlier report are replaced.
    with args.out_folder.staged() as staging:
        data = save_gallery(gallery, staging, args.crop_size, args.duplicate_cosine, meta)
        write_report_html(data, staging, title=f'Prototype report: '
                          f'{osp.basename(args.checkpoint)}')
        args.out_folder.commit(staging, replace_subfolders=[CROPS])
    data['root'] = osp.abspath(args.out)
    page = osp.join(args.out, PAGE)
    seconds = time.perf_counter() - start
    crops = sum(len(r['top']) for r in data['prototypes'])
    dead = sum(r['dead'] for r in data['prototypes'])
    dups = sum(bool(r['duplicates']) for r in data['prototypes'])
    print(f'prototype_report: {n} images: {seconds_pass:.1f} s gallery pass, {seconds:.1f} s '
          'with crops and page; '
          f'{crops} crops, {dead} dead prototypes, {dups} with a near-duplicate')
    untrained = sum(bool(r['untrained']) for r in data['prototypes'])
    print(f'prototype_report: {untrained} prototypes never trained (classes: '
          f"{[data['classes'][c] for c in data['untrained_classes']]}); "
          f"{data['untrained_check']}")
    print(f'prototype_report: open {osp.abspath(page)}')
    return data


if __name__ == '__main__':
    main(sys.argv[1:])
