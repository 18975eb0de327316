"""Write configs/protoseg/metafile.yaml (MMSeg's model-zoo format) from the configs.

Training data, batch size, crop size, schedule and architecture are read from each config
(Config.fromfile, so they cannot drift from it); the mIoU figures are the paper's (Tables 1-3
and 5(d), "mIoU(paper)") or, for the authors' checkpoint, their README's ("mIoU(authors)"):
no checkpoint trained by this package is released, so no row has our own result or weights.
``--check`` exits 1 if the file differs from what it would write (the tests compare
:func:`metafile_text` with the file in their process).

    python tools/dev/make_metafile.py [--check]
"""
import argparse
import glob
import os.path as osp
import re
import sys

import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
METAFILE = osp.join(REPO, 'configs', 'protoseg', 'metafile.yaml')
PAPER = dict(Title='Rethinking Semantic Segmentation: A Prototype View',
             URL='https://arxiv.org/abs/2203.15102')
CODE = 'https://github.com/tfzhou/ProtoSeg'

#: Config name -> (paper's baseline mIoU, paper's ProtoSeg mIoU, where in the paper).
#: MiT-B4 rows: the paper's decoder has 768 channels (the segformer-c768 configs); the 256
#: channel configs are MMSeg's decoder, so the paper's figure is their target, not a match.
PAPER_MIOU = {
    'protoseg_fcn_r101-d8_4xb4-160k_ade20k-512x512': (39.9, 41.1, 'Table 1'),
    'protoseg_fcn_hr48_4xb4-160k_ade20k-512x512': (42.0, 43.0, 'Table 1'),
    'protoseg_swin-base-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512':
    (48.0, 48.6, 'Table 1'),
    'protoseg_segformer_mit-b4_8xb2-160k_ade20k-512x512': (50.9, 51.7, 'Table 1, 768-ch decoder'),
    'protoseg_segformer-c768_mit-b4_8xb2-160k_ade20k-512x512': (50.9, 51.7, 'Table 1'),
    'protoseg_segformer_mit-b2_8xb2-160k_ade20k-512x512': (None, 46.4, 'Table 5'),
    'protoseg_segformer_mit-b2_distance-cosine_8xb2-160k_ade20k-512x512':
    (None, 46.4, 'Table 5(d)'),
    'protoseg_segformer_mit-b2_distance-standard_8xb2-160k_ade20k-512x512':
    (None, 45.7, 'Table 5(d)'),
    'protoseg_segformer_mit-b2_distance-huberized_8xb2-160k_ade20k-512x512':
    (None, 45.2, 'Table 5(d)'),
    'protoseg_fcn_r101-d8_4xb2-80k_cityscapes-512x1024': (78.1, 79.1, 'Table 2'),
    'protoseg_fcn_hr48_4xb2-80k_cityscapes-512x1024': (80.4, 81.1, 'Table 2'),
    'protoseg_swin-base-patch4-window7-in1k-pre_upernet_8xb1-80k_cityscapes-512x1024':
    (79.8, 80.6, 'Table 2'),
    'protoseg_segformer_mit-b4_8xb1-160k_cityscapes-1024x1024':
    (80.7, 81.3, 'Table 2, 768-ch decoder'),
    'protoseg_segformer-c768_mit-b4_8xb1-160k_cityscapes-1024x1024': (80.7, 81.3, 'Table 2'),
    'protoseg_segformer_mit-b2_8xb1-160k_cityscapes-1024x1024': (None, None, None),
    'protoseg_fcn_r101-d8_4xb4-80k_coco-stuff164k-512x512': (32.5, 34.0, 'Table 3'),
    'protoseg_fcn_hr48_4xb4-80k_coco-stuff164k-512x512': (38.7, 39.9, 'Table 3'),
    'protoseg_swin-base-patch4-window7-in1k-pre_upernet_8xb2-80k_coco-stuff164k-512x512':
    (41.5, 42.4, 'Table 3'),
    'protoseg_segformer_mit-b4_8xb2-80k_coco-stuff164k-512x512':
    (42.5, 43.3, 'Table 3, 768-ch decoder'),
    'protoseg_segformer-c768_mit-b4_8xb2-80k_coco-stuff164k-512x512': (42.5, 43.3, 'Table 3'),
    'protoseg_segformer_mit-b2_8xb2-80k_coco-stuff164k-512x512': (None, None, None),
}
AUTHORS = 'protoseg_hrnet-w48-authors_4xb2-80k_cityscapes-512x1024'
#: Not a model-zoo row: the CPU demo (80 iterations on a 15-image subset).
NOT_IN_ZOO = ('protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160', )
DATASETS = {'ADE20KDataset': 'ADE20K', 'CityscapesDataset': 'Cityscapes',
            'COCOStuffDataset': 'COCO-Stuff 164k'}
BACKBONES = {'ResNetV1c': 'R-101-D8', 'HRNet': 'HRNetV2p-W48', 'HRNetRefAlign': 'HRNetV2p-W48',
             'SwinTransformer': 'Swin-B'}
DECODERS = {'FCNHead': 'FCN', 'UPerHead': 'UPerNet', 'SegformerHead': 'Segformer'}


def config_files():
    return sorted(glob.glob(osp.join(REPO, 'configs', 'protoseg', '**', '*.py'),
                            recursive=True))


def model_entry(path: str) -> dict:
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    name = osp.splitext(osp.basename(path))[0]
    gpus, per_gpu = map(int, re.search(r'_(\d+)xb(\d+)-', name).groups())
    assert per_gpu == cfg.train_dataloader.batch_size, name
    backbone = cfg.model.backbone.type
    arch = BACKBONES.get(backbone) or 'MIT-' + re.search(r'mit-(b\d)', name).group(1).upper()
    decoder = cfg.model.decode_head.decoder
    head = DECODERS[decoder.type]
    if decoder.type == 'SegformerHead':
        head += f' ({decoder.channels} ch)'
    dataset = DATASETS[cfg.train_dataloader.dataset.type]
    crop = 'x'.join(str(s) for s in cfg.crop_size)
    meta = {'Training Data': dataset, 'Batch Size': gpus * per_gpu,
            'Crop Size': crop, 'Lr schd': cfg.train_cfg.max_iters,
            'Architecture': [arch, head, 'ProtoHead'],
            'Training Resources': f'{gpus}x GPUs'}
    entry = {'Name': name, 'In Collection': 'ProtoSeg', 'Config':
             osp.relpath(path, REPO), 'Metadata': meta}
    metrics = {}
    if name == AUTHORS:
        metrics['mIoU(authors)'] = 80.1
        meta['Results Source'] = ("the authors' README (single scale, Cityscapes val) for "
                                  'their released checkpoint, converted, not re-measured here')
        entry['Converted From'] = {
            'Weights': 'hrnet_w48_proto_lr1x_hrnet_proto_80k_latest.pth (released by the '
                       f'authors, {CODE})',
            'Code': CODE,
            'Conversion': 'python tools/model_converters/convert_openseg_protoseg.py '
                          'SRC.pth DST.pth (docs/authors_checkpoint.md)'}
    else:
        base, proto, where = PAPER_MIOU[name]
        if proto is not None:
            metrics['mIoU(paper)'] = proto
            meta['Results Source'] = (f'the paper, {where}; not reproduced here, no '
                                      'checkpoint released')
        if base is not None:
            metrics['baseline mIoU(paper)'] = base
    if metrics:
        entry['Results'] = [{'Task': 'Semantic Segmentation', 'Dataset': dataset,
                             'Metrics': metrics}]
    entry['Paper'] = dict(PAPER)
    entry['Framework'] = 'PyTorch'
    return entry


def metafile_text() -> str:
    import mmseg_proto  # noqa: F401  (registers HRNetRefAlign etc.)
    models = [model_entry(p) for p in config_files()
              if osp.splitext(osp.basename(p))[0] not in NOT_IN_ZOO]
    doc = {'Collections': [{
        'Name': 'ProtoSeg', 'License': 'Apache License 2.0',
        'Metadata': {'Training Data': ['ADE20K', 'Cityscapes', 'COCO-Stuff 164k']},
        'Paper': dict(PAPER), 'README': 'configs/protoseg/README.md', 'Frameworks': ['PyTorch']}],
        'Models': models}
    return ('# Generated by tools/dev/make_metafile.py from the configs; edit that script.\n' +
            yaml.safe_dump(doc, sort_keys=False, width=100, allow_unicode=True))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check', action='store_true', help='compare, do not write')
    args = p.parse_args()
    text = metafile_text()
    if args.check:
        with open(METAFILE) as f:
            same = f.read() == text
        print('up to date' if same else f'{METAFILE} is stale: run {sys.argv[0]}')
        sys.exit(0 if same else 1)
    with open(METAFILE, 'w') as f:
        f.write(text)
    print(f'wrote {METAFILE}')


if __name__ == '__main__':
    main()
