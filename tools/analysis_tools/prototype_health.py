"""Prototype health of a ProtoSeg checkpoint on a dataset split.

Per class: how many of its K prototypes are the nearest one (of the class's own) for at
least 1% of its labelled pixels, the exponential of the entropy of that use, and the
pairwise cosines between its prototypes; then the mean over classes. Prints a Markdown
table (and writes it with --out). The config may inherit ours through ``mmseg_proto::``.

    python tools/analysis_tools/prototype_health.py CONFIG CHECKPOINT [--split val]
        [--num-images N] [--out health.md]
"""
import argparse
import os.path as osp
from typing import Optional, Sequence

from mmseg_proto.evaluation import (format_health_table, nearest_prototype_usage,
                                    prototype_health)
from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
from mmseg_proto.utils.output_files import OutputPathError, check_output_file
from mmseg_proto.visualization.prototypes import (collect_embeddings, load_model,
                                                  proto_head)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{value} images: N must be >= 1')
    return value


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Print the health table of CONFIG/CHECKPOINT (see the module docstring) and return it.

    Args:
        argv (Sequence[str], optional): The command line without the program name.
            Default: ``sys.argv[1:]``.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--split', choices=('train', 'val', 'test'), default='val',
                   help="which dataloader's dataset of the config (its test-time "
                        'pipeline is not applied to train; default: val)')
    p.add_argument('--num-images', type=positive_int, default=None, metavar='N',
                   help='use the first N images, N >= 1 (default: all)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--out', help='also write the table to this file')
    args = p.parse_args(argv)
    out = None
    if args.out:  # before anything is built: never over an input or a file not ours
        try:
            out = check_output_file(args.out, 'prototype_health',
                                    dict(config=args.config, checkpoint=args.checkpoint))
        except OutputPathError as err:
            p.error(str(err))

    from mmseg.registry import DATASETS
    with mmseg_proto_config_scope():  # the config may inherit mmseg_proto::
        model = load_model(args.config, args.checkpoint, args.device)
        head = proto_head(model)
        loader = model.cfg.get(f'{args.split}_dataloader')
        if not loader:
            raise SystemExit(f'{args.config} has no {args.split}_dataloader; choose another '
                             '--split (train, val, test)')
        dataset = DATASETS.build(loader['dataset'])
    if len(dataset) == 0:
        raise SystemExit(f'prototype_health: the {args.split} dataset of {args.config} has '
                         'no images; check its data_root, or choose another --split')
    n = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    emb, labels = collect_embeddings(model, dataset, range(head.num_classes), num_images=n,
                                     per_class=10**12)
    usage = nearest_prototype_usage(emb, labels, head.prototypes.detach().cpu())
    table = format_health_table(prototype_health(head.prototypes.detach().cpu(), usage),
                                model.dataset_meta.get('classes'))
    header = f'Prototype health: {args.checkpoint}, {args.split} split, {n} images\n\n'
    print(header + table)
    if out is not None:
        with out.atomic(osp.basename(args.out)) as tmp:
            with open(tmp, 'w', encoding='utf-8') as f:
                f.write(header + table + '\n')
    return table


if __name__ == '__main__':
    main()
