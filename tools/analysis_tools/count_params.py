"""Parameter counts of ProtoSeg configs and of their parametric baselines.

For each ProtoSeg config (default: every model-zoo config under
``configs/protoseg/{ade20k,cityscapes,coco-stuff164k}`` that names its
baseline in a ``# Baseline: <config>`` header line) this builds, on the CPU
and without pretrained weights, the ProtoSeg model and the baseline model
and prints a Markdown table:

- Baseline: the MMSeg config named in the header (``mmseg::...``, ``mmseg_proto::...`` or a
  composed config under ``configs/baselines``).
- Parametric: the ProtoSeg model with its classifier put back (the decoder
  plus a 1x1 conv of ``channels x num_classes + num_classes``) and without
  the two LayerNorms: the baseline of exactly this architecture. It differs
  from "Baseline" only for variants such as SegFormer decoder channels=768.
- ProtoSeg: the ProtoSeg model's parameters. The prototypes are a buffer, not
  parameters; their number of values is listed separately.

Counts are of the inference model (the auxiliary head, used only in
training, is excluded); the ``+aux`` columns include it.

Usage::

    python tools/analysis_tools/count_params.py
    python tools/analysis_tools/count_params.py configs/protoseg/ade20k/protoseg_fcn_r101-d8_4xb4-160k_ade20k-512x512.py
"""
import argparse
import copy
import glob
import os
import os.path as osp
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
ZOO_DATASETS = ('ade20k', 'cityscapes', 'coco-stuff164k')
BASELINE_RE = re.compile(r'^#\s*Baseline:\s*(\S+)', re.M)
PAPER_RE = re.compile(r'(\d+\.\d+)M\s*->\s*(\d+\.\d+)M')


def zoo_configs() -> List[str]:
    """The model-zoo configs: those that name a baseline in their header."""
    paths = []
    for dataset in ZOO_DATASETS:
        pattern = osp.join(REPO, 'configs', 'protoseg', dataset, '*.py')
        paths += [p for p in sorted(glob.glob(pattern)) if baseline_of(p)]
    return paths


def _header(path: str) -> str:
    lines = []
    with open(path, encoding='utf-8') as f:
        for line in f:
            if not line.startswith('#'):
                break
            lines.append(line)
    return ''.join(lines)


def baseline_of(path: str) -> Optional[str]:
    """The baseline config named by ``# Baseline:`` in the header, resolved
    to a file path (``mmseg::`` into the installed MMSeg), or None."""
    match = BASELINE_RE.search(_header(path))
    if match is None:
        return None
    return resolve_config(match.group(1))


def resolve_config(name: str) -> str:
    """``mmseg::x.py`` -> installed MMSeg config; ``mmseg_proto::x.py`` -> this
    repository's ``configs/x.py``; repo-relative paths -> absolute. Raises
    FileNotFoundError naming the config, ValueError for another scope."""
    if name.startswith('mmseg::'):
        import mmseg
        path = osp.join(
            osp.dirname(mmseg.__file__), '.mim', 'configs',
            name[len('mmseg::'):])
    elif name.startswith('mmseg_proto::'):
        path = osp.join(REPO, 'configs', name[len('mmseg_proto::'):])
    elif '::' in name.split('/')[0]:
        raise ValueError(f'baseline config {name!r}: only the mmseg:: and mmseg_proto:: '
                         'scopes, a path relative to the repository or an absolute path '
                         'are read')
    elif osp.isabs(name):
        path = name
    else:
        path = osp.join(REPO, name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'baseline config {name!r} not found '
                                f'(looked at {path})')
    return path


def paper_params(path: str) -> Optional[Tuple[float, float]]:
    """The paper's "# Param (M)" (baseline, ProtoSeg) quoted in the header."""
    text = ' '.join(
        line.lstrip('#').strip() for line in _header(path).splitlines())
    match = PAPER_RE.search(text)
    return (float(match.group(1)), float(match.group(2))) if match else None


def build_model(cfg) -> nn.Module:
    """Build ``cfg.model`` on the CPU without loading pretrained weights,
    with SyncBN reverted to BN."""
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.pop('pretrained', None)
    if 'backbone' in model_cfg:
        model_cfg.backbone.init_cfg = None
        model_cfg.backbone.pop('pretrained', None)
    return revert_sync_batchnorm(MODELS.build(model_cfg))


def n_params(module: Optional[nn.Module]) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


def count(config: str) -> Dict[str, float]:
    """Parameter counts of one ProtoSeg config and of its baseline."""
    from mmengine.config import Config

    from mmseg_proto.utils.config_scope import mmseg_proto_config_scope
    base_path = baseline_of(config)
    if base_path is None:
        raise ValueError(f'{config}: no "# Baseline: <config>" line in its '
                         'header; name the parametric config it compares to')
    with mmseg_proto_config_scope():  # configs may inherit mmseg_proto::
        proto = build_model(Config.fromfile(config))
        base = build_model(Config.fromfile(base_path))
    head = proto.decode_head
    if type(head).__name__ != 'ProtoHead':
        raise ValueError(f'{config}: decode_head is {type(head).__name__}, '
                         'not ProtoHead')
    proto_aux = n_params(getattr(proto, 'auxiliary_head', None))
    base_aux = n_params(getattr(base, 'auxiliary_head', None))
    added = n_params(head) - n_params(head.decoder)  # norms + projection
    classifier = head.decoder.channels * head.num_classes + head.num_classes
    proto_inf = n_params(proto) - proto_aux
    return dict(
        baseline=n_params(base) - base_aux,
        baseline_aux=n_params(base),
        baseline_classifier=n_params(base.decode_head.conv_seg),
        parametric=proto_inf - added + classifier,
        protoseg=proto_inf,
        protoseg_aux=n_params(proto),
        added=added,
        prototypes=head.prototypes.numel())


def markdown(rows: List[Tuple[str, Dict[str, float], Optional[tuple]]]) -> str:
    m, k = 1e6, 1e3
    out = [
        '| Config | Baseline (M) | Parametric (M) | ProtoSeg (M) | '
        'Baseline +aux (M) | ProtoSeg +aux (M) | classifier removed (K) | '
        'LayerNorms added (K) | prototypes (K values, buffer) | '
        'Paper, ADE20K (M) |',
        '|' + '---|' * 10,
    ]
    for name, c, paper in rows:
        paper_txt = f'{paper[0]} -> {paper[1]}' if paper else '-'
        out.append(
            f"| {name} | {c['baseline'] / m:.2f} | {c['parametric'] / m:.2f}"
            f" | {c['protoseg'] / m:.2f} | {c['baseline_aux'] / m:.2f} | "
            f"{c['protoseg_aux'] / m:.2f} | "
            f"{(c['parametric'] - c['protoseg'] + c['added']) / k:.1f} | "
            f"{c['added'] / k:.1f} | {c['prototypes'] / k:.1f} | "
            f'{paper_txt} |')
    return '\n'.join(out)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Parameter counts of ProtoSeg configs and baselines')
    parser.add_argument(
        'configs', nargs='*',
        help='ProtoSeg configs with a "# Baseline:" header line '
        '(default: the model zoo)')
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    configs = args.configs or zoo_configs()
    if not configs:
        sys.exit('count_params: no configs given and none found in the '
                 'model zoo')
    os.environ.setdefault('OMP_NUM_THREADS', '2')
    rows = []
    for config in configs:
        print(f'counting {config} ...', file=sys.stderr, flush=True)
        rows.append((osp.splitext(osp.basename(config))[0], count(config),
                     paper_params(config)))
    print(markdown(rows))


if __name__ == '__main__':
    main()
