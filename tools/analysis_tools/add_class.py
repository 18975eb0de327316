"""Add one or more classes to a trained MMSeg model from a few labelled images.

    python tools/analysis_tools/add_class.py CONFIG CHECKPOINT --name bollard \\
        --support bollard.txt --out work_dirs/with_bollard

``--support`` is a text file with one ``IMAGE MASK`` pair per line (shell quoting for
paths with spaces; ``#`` starts a comment; relative paths are relative to the list file's
folder). A mask is binary (0 and one other value) or, with ``--mask-value V``, a label map
holding the class as V. Several classes: ``--name a b --support a.txt b.txt``.

Writes ``--out/<config name>.py`` and ``--out/<checkpoint name>`` (a model with C + n
classes, ``dataset_meta`` extended), which MMSeg's ``tools/test.py``, ``init_model`` /
``inference_model``, ``MMSegInferencer`` and this package's tools load as they are. The
written config's val/test datasets list the C + n classes (``BaseSegDataset`` with the
original dataset's file suffixes): their label maps must hold the new classes as C, C + 1,
... ProtoHead models get new prototypes; any other decode head with a 1x1 ``conv_seg`` gets
an imprinted row (docs/add_class.md).
"""
import argparse
import copy
import inspect
import os
import os.path as osp
import shlex
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--name', nargs='+', required=True, help='new class name(s)')
    p.add_argument('--support', nargs='+', required=True,
                   help='one list of IMAGE MASK lines per name')
    p.add_argument('--mask-value', type=int, nargs='+',
                   help='the class value in label-map masks, one per name (default: '
                   'binary masks)')
    p.add_argument('--num-prototypes', type=int,
                   help='ProtoHead: distinct prototypes of a new class, at most the head\'s K '
                   '(default: 1, the mean of its support embeddings; measured better than K '
                   'on CamVid, docs/add_class.md)')
    p.add_argument('--no-calibrate', action='store_true',
                   help="offset = the mean of the trained classes' (plain imprinting)")
    p.add_argument('--out', required=True, help='folder for the new config and checkpoint')
    p.add_argument('--force', action='store_true',
                   help='replace a checkpoint already in --out')
    p.add_argument('--device', default='cpu')
    args = p.parse_args(argv)
    if len(args.support) != len(args.name):
        p.error(f'{len(args.name)} --name but {len(args.support)} --support lists: give '
                'one list per name')
    if args.mask_value is not None and len(args.mask_value) != len(args.name):
        p.error(f'{len(args.name)} --name but {len(args.mask_value)} --mask-value')
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f'--device {args.device!r} is not a device (e.g. cpu, cuda, cuda:1)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        p.error(f'--device {args.device}: this torch sees no CUDA device; use --device cpu '
                '(adding a class takes seconds on a CPU)')
    return args


def read_support_list(path: str) -> list:
    """(image, mask) pairs of a support list; paths relative to the list's folder."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SystemExit(f'add_class: cannot read the support list {path}: {err}')
    pairs, base = [], osp.dirname(osp.abspath(path))
    for number, line in enumerate(lines, 1):
        try:
            fields = shlex.split(line, comments=True)
        except ValueError as err:
            raise SystemExit(f'add_class: {path}:{number}: {err}')
        if not fields:
            continue
        if len(fields) != 2:
            raise SystemExit(f'add_class: {path}:{number}: expected IMAGE MASK, got '
                             f'{len(fields)} field(s) (quote paths with spaces)')
        pairs.append(tuple(osp.join(base, f) for f in fields))
    if not pairs:
        raise SystemExit(f'add_class: the support list {path} names no image')
    return pairs


def output_folder(args, supports: list):
    """The --out folder under the package's output policy (never an input by any spelling,
    never a file another tool or the user wrote, atomic writes) and the two file names;
    SystemExit before any work when it is refused, or when it already holds a checkpoint
    (without --force)."""
    from mmseg_proto.utils.output_files import OutputFolder, OutputPathError
    config_name = osp.splitext(osp.basename(args.config))[0] + '.py'
    ckpt_name = osp.basename(args.checkpoint)
    ckpt_name = ckpt_name if ckpt_name.endswith('.pth') else ckpt_name + '.pth'
    out = OutputFolder(args.out, 'add_class')
    inputs = dict(config=args.config, checkpoint=args.checkpoint, support=args.support,
                  images=[i for pairs in supports for i, _ in pairs],
                  masks=[m for pairs in supports for _, m in pairs])
    try:
        out.check(inputs, names=[config_name, ckpt_name])
    except OutputPathError as err:
        raise SystemExit(str(err))
    if not args.force and osp.isdir(args.out):
        held = sorted(f for f in os.listdir(args.out) if f.endswith('.pth'))
        if held:
            raise SystemExit(f'add_class: {args.out} already holds a checkpoint ({held[0]}); '
                             'give another --out or pass --force')
    return out, config_name, ckpt_name


def check_loaded(model, checkpoint: str) -> None:
    """SystemExit unless every tensor of ``model`` is the checkpoint's: ``init_model``
    leaves a tensor the checkpoint lacks (another model's checkpoint) or has in another
    shape (another class count) at its random initialisation with only a warning, and a
    fine-tuning config (``load_prototypes=False``) keeps fresh prototypes."""
    from mmseg_proto.utils.onnx_export import ExportError, load_trained_state
    try:
        load_trained_state(model, checkpoint)
    except ExportError as err:
        message = str(err).replace('ONNX export: ', '').replace(
            'export with the config', 'give the config').replace(
            'Export with the config', 'Give the config').replace(
            'the export would', 'the new model would').replace(
            'The export would', 'The new model would')
        raise SystemExit(f'add_class: the checkpoint does not fit the config: {message}; '
                         'nothing was written')


def extended_dataset(dataset: dict, classes, palette) -> dict:
    """A val/test dataset config listing ``classes``: ``BaseSegDataset`` with the original
    type's file suffixes and ``reduce_zero_label`` (a dataset type's own class list cannot
    be extended)."""
    from mmseg.registry import DATASETS
    dataset = copy.deepcopy(dataset)
    cls = DATASETS.get(dataset.get('type')) if isinstance(dataset.get('type'), str) else None
    if cls is not None:
        defaults = {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items()
                    if v.default is not inspect.Parameter.empty}
        for key in ('img_suffix', 'seg_map_suffix', 'reduce_zero_label'):
            if key not in dataset and key in defaults:
                dataset[key] = defaults[key]
    dataset['type'] = 'BaseSegDataset'
    dataset['metainfo'] = dict(classes=tuple(classes), palette=[list(c) for c in palette])
    return dataset


def main(argv=None):
    args = parse_args(argv)
    supports = [read_support_list(path) for path in args.support]
    out, config_name, ckpt_name = output_folder(args, supports)
    from mmengine.utils import ProgressBar
    from mmseg.apis import init_model

    import mmseg_proto  # noqa: F401
    from mmseg_proto.apis import AddClassError, add_classes
    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    with mmseg_proto_config_scope():  # checked on the CPU, where the checkpoint is read
        model = init_model(args.config, args.checkpoint, device='cpu')
    check_loaded(model, args.checkpoint)
    model = model.to(args.device)
    total = sum(len(s) for s in supports)
    print(f'add_class: embedding {total} support image(s)', flush=True)
    bar = ProgressBar(total)
    try:
        new, report = add_classes(model, args.name, supports, mask_values=args.mask_value,
                                  calibrate=not args.no_calibrate,
                                  num_prototypes=args.num_prototypes,
                                  progress=lambda done: bar.update())
    except AddClassError as err:
        raise SystemExit(f'\nadd_class: {err}; nothing was written')
    print()
    cfg = new.cfg
    meta = new.dataset_meta
    for loader in ('val_dataloader', 'test_dataloader'):
        if cfg.get(loader) and cfg[loader].get('dataset'):
            cfg[loader].dataset = extended_dataset(cfg[loader].dataset, meta['classes'],
                                                   meta['palette'])
    cfg.load_from = None
    state = {k: v.detach().cpu() for k, v in new.state_dict().items()}
    added = [dict(name=c.name, index=c.index, support_images=c.support_images,
                  pixels=c.pixels, prototypes=c.prototypes, offset=c.offset,
                  support_iou=c.support_iou) for c in report.classes]
    with out.atomic(ckpt_name) as tmp:
        torch.save(dict(meta=dict(dataset_meta=dict(classes=list(meta['classes']),
                                                    palette=meta['palette']),
                                  added_classes=added, source_checkpoint=args.checkpoint),
                        state_dict=state), tmp)
    with out.atomic(config_name) as tmp:
        cfg.dump(tmp)
    config_out, ckpt_out = osp.join(args.out, config_name), osp.join(args.out, ckpt_name)
    method = ('new prototypes' if report.method == 'prototypes' else 'an imprinted conv_seg row')
    for c in report.classes:
        placed = f', {c.prototypes} prototype(s) placed' if report.method == 'prototypes' else ''
        print(f'add_class: class {c.index} {c.name!r} by {method}: {c.pixels} support pixels '
              f'from {c.support_images} image(s) at the decoder resolution{placed}; offset '
              f'{c.offset:+.3f} (support IoU {100 * c.support_iou:.1f}%)'
              + ''.join(f'; {n}' for n in c.notes))
    print(f'add_class: {len(report.classes)} class(es) added in {report.seconds:.1f} s; '
          f'wrote {config_out} and {ckpt_out}')


if __name__ == '__main__':
    sys.exit(main())
