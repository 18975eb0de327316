"""The model zoo (configs/protoseg/{ade20k,cityscapes,coco-stuff164k}) and
the "ProtoSeg for any MMSeg config" recipe (docs/model_zoo.md), on the CPU.

Models are built without pretrained weights and run one training step on a
tiny input (inputs are shrunk, never the models)."""
import functools
import inspect
import importlib.util
import os.path as osp

import pytest
import torch
from conftest import REPO, make_samples
from mmengine.config import Config

from mmseg_proto.models.decode_heads.proto_head import ProtoHead

_spec = importlib.util.spec_from_file_location(
    'count_params', osp.join(REPO, 'tools', 'analysis_tools', 'count_params.py'))
count_params = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(count_params)

ZOO = count_params.zoo_configs()
ZOO_IDS = [osp.basename(p)[:-3] for p in ZOO]
DATASET_TYPES = {
    'ade20k': 'ADE20KDataset',
    'cityscapes': 'CityscapesDataset',
    'coco-stuff164k': 'COCOStuffDataset',
}
PROTO_LOSSES = [
    dict(type='CrossEntropyLoss', loss_weight=1.0),
    dict(type='PixelPrototypeContrastLoss', loss_weight=0.01),
    dict(type='PixelPrototypeDistanceLoss', loss_weight=0.001),
]
# Keys a ProtoSeg config must share with its baseline: data, evaluation
# (including multi-scale test), optimizer and schedule.
SHARED_KEYS = ('train_dataloader', 'val_dataloader', 'test_dataloader',
               'val_evaluator', 'test_evaluator', 'optim_wrapper',
               'param_scheduler', 'train_cfg', 'val_cfg', 'test_cfg',
               'default_hooks', 'env_cfg', 'default_scope', 'tta_model',
               'tta_pipeline')


@functools.lru_cache(maxsize=None)
def load(path):
    """Config.fromfile, cached (treat the result as read-only)."""
    return Config.fromfile(path)


def plain(cfg):
    """Config as nested builtins without the ``_scope_`` keys that
    ``mmseg::`` inheritance adds."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != '_scope_'}
        if isinstance(obj, (list, tuple)):
            return type(obj)(strip(v) for v in obj)
        return obj
    return strip(cfg.to_dict() if isinstance(cfg, Config) else cfg)


def dataset_base(config):
    """MMSeg's own dataset file for the benchmark of a zoo config."""
    dataset = osp.basename(osp.dirname(config))
    name = dataset
    if dataset == 'cityscapes' and '1024x1024' in config:
        name = 'cityscapes_1024x1024'
    return count_params.resolve_config(f'mmseg::_base_/datasets/{name}.py')


def train_one_step(model, num_classes, size=64, batch=2):
    """model.loss + backward on random data; returns the ProtoHead losses.

    Batch 2: pyramid pooling (PSP/UPer) has 1x1 maps that BN cannot
    normalise with batch 1 in training."""
    torch.manual_seed(0)
    model.train()
    inputs = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, num_classes, (batch, size, size))
    labels[:, :4] = 255
    samples = make_samples(labels)
    losses = model.loss(inputs, samples)
    total = sum(v for k, v in losses.items() if 'loss' in k)
    assert torch.isfinite(total), losses
    total.backward()
    head = model.decode_head
    assert head.bank.accumulate()  # what PrototypeUpdateHook does on one process
    before = head.prototypes.clone()
    assert head.bank.apply() == {}
    assert head.prototypes.shape == before.shape
    assert torch.isfinite(head.prototypes).all()
    return losses


def test_zoo_is_complete():
    """Every (model, dataset) row of the paper's Tables 1-3 has a config,
    plus the paper-matching SegFormer variants."""
    names = set(ZOO_IDS)
    for dataset, sched in (('ade20k', '160k'), ('cityscapes', '80k'),
                           ('coco-stuff164k', '80k')):
        for model in ('fcn_r101-d8', 'fcn_hr48',
                      'swin-base-patch4-window7-in1k-pre_upernet'):
            assert any(n.startswith(f'protoseg_{model}_') and dataset in n
                       and sched in n for n in names), (model, dataset)
        for model in ('segformer_mit-b2', 'segformer_mit-b4',
                      'segformer-c768_mit-b4'):
            assert any(n.startswith(f'protoseg_{model}_') and dataset in n
                       for n in names), (model, dataset)
    assert len(ZOO) >= 18


@pytest.mark.parametrize('config', ZOO, ids=ZOO_IDS)
def test_zoo_config_matches_baseline(config):
    cfg = load(config)
    base = load(count_params.baseline_of(config))
    # The plugin and its hook are on.
    assert 'mmseg_proto' in cfg.custom_imports['imports']
    assert dict(type='PrototypeUpdateHook') in cfg.custom_hooks
    # Data, pipelines, evaluation, optimizer, schedule: the baseline's.
    cfg_d, base_d = plain(cfg), plain(base)
    for key in SHARED_KEYS:
        assert cfg_d.get(key) == base_d.get(key), key
    # ... and the baseline's data is MMSeg's for the benchmark.
    dataset = osp.basename(osp.dirname(config))
    mmseg_data = load(dataset_base(config))
    for split in ('train', 'val', 'test'):
        ds = cfg_d[f'{split}_dataloader']['dataset']
        assert ds['type'] == DATASET_TYPES[dataset]
        assert ds == plain(mmseg_data)[f'{split}_dataloader']['dataset']
    # The model: the baseline's, with the decode head as ProtoHead's
    # decoder and the paper's ProtoSeg settings.
    model, base_model = cfg_d['model'], base_d['model']
    for key in set(model) | set(base_model):
        if key != 'decode_head':
            assert model.get(key) == base_model.get(key), key
    head = model['decode_head']
    assert head['type'] == 'ProtoHead'
    assert head['num_classes'] == base_model['decode_head']['num_classes']
    # The paper's settings are ProtoHead's defaults, which the config keeps.
    defaults = {k: v.default for k, v in
                inspect.signature(ProtoHead.__init__).parameters.items()}
    for key, paper in (('projection', 'none'), ('num_prototypes', 10),
                       ('momentum', 0.999), ('sinkhorn_epsilon', 0.05),
                       ('sinkhorn_iters', 3)):
        assert head.get(key, defaults[key]) == paper, key
    assert [dict(d) for d in head.get('loss_decode', defaults['loss_decode'])] \
        == PROTO_LOSSES
    assert cfg_d['custom_hooks'] == [dict(type='PrototypeUpdateHook')]
    assert cfg_d['custom_imports']['imports'] == ['mmseg_proto']
    decoder = dict(head['decoder'])
    if 'c768' in config:
        assert decoder.pop('channels') == 768
        assert base_model['decode_head']['channels'] == 256
        decoder['channels'] = 256
    assert decoder == base_model['decode_head']


@pytest.mark.parametrize('config', ZOO, ids=ZOO_IDS)
def test_zoo_names(config):
    """protoseg_{model}_{gpus}x{batch}-{iters}k_{dataset}-{crop}.py agrees
    with the config."""
    cfg = load(config)
    stem = osp.basename(config)[:-3]
    *_, gpus_sched, data_crop = stem.split('_')
    gpus_batch, sched = gpus_sched.split('-')
    gpus, batch = (int(v) for v in gpus_batch.split('xb'))
    dataset, crop = data_crop.rsplit('-', 1)
    assert dataset == osp.basename(osp.dirname(config))
    assert cfg.train_dataloader.batch_size == batch
    assert gpus * batch in (8, 16)  # the paper's batch sizes
    assert cfg.train_cfg.max_iters == int(sched.rstrip('k')) * 1000
    h, w = (int(v) for v in crop.split('x'))
    assert tuple(cfg.crop_size) in ((h, w), (w, h))


def test_short_name_config_is_the_zoo_config():
    short = load(osp.join(REPO, 'configs', 'proto_segformer_b2.py'))
    grouped = load(osp.join(
        REPO, 'configs', 'protoseg', 'ade20k',
        'protoseg_segformer_mit-b2_8xb2-160k_ade20k-512x512.py'))
    assert plain(short) == plain(grouped)
    assert short.train_cfg.max_iters == 160000
    assert short.train_dataloader.batch_size * 8 == 16
    assert short.optim_wrapper.optimizer.type == 'AdamW'
    head = short.model.decode_head
    assert head.decoder.type == 'SegformerHead'
    assert head.decoder.in_channels == [64, 128, 320, 512]


@pytest.mark.parametrize('config', ZOO, ids=ZOO_IDS)
def test_zoo_model_trains_one_step(config):
    cfg = load(config)
    model = count_params.build_model(cfg)
    head = model.decode_head
    assert type(head).__name__ == 'ProtoHead'
    assert not hasattr(head, 'conv_seg')
    assert head.prototypes.shape == (cfg.model.decode_head.num_classes, 10,
                                     cfg.model.decode_head.decoder.channels)
    losses = train_one_step(model, head.num_classes)
    assert {'decode.loss_ce', 'decode.loss_ppc', 'decode.loss_ppd'} <= set(
        losses)


# ---------------------------------------------------------------------------
# "ProtoSeg for any MMSeg config": the recipe of docs/model_zoo.md.
RECIPE = """_base_ = ['{base}']
custom_imports = dict(imports=['mmseg_proto'], allow_failed_imports=False)
model = dict(
    decode_head=dict(
        _delete_=True,
        type='ProtoHead',
        num_classes={{{{_base_.model.decode_head.num_classes}}}},
        decoder={{{{_base_.model.decode_head}}}}))
custom_hooks = [dict(type='PrototypeUpdateHook')]
"""
STOCK = {
    'FCNHead': 'fcn/fcn_r50-d8_4xb4-80k_ade20k-512x512.py',
    'PSPHead': 'pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py',
    'ASPPHead': 'deeplabv3/deeplabv3_r18-d8_4xb2-80k_cityscapes-512x1024.py',
    'DepthwiseSeparableASPPHead':
    'deeplabv3plus/deeplabv3plus_r18-d8_4xb2-80k_cityscapes-512x1024.py',
    'UPerHead': 'swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_'
    'ade20k-512x512.py',
    'SegformerHead': 'segformer/segformer_mit-b0_8xb2-160k_ade20k-512x512.py',
}


@pytest.mark.parametrize('head_type', list(STOCK))
def test_any_config_recipe(head_type, tmp_path):
    base_name = 'mmseg::' + STOCK[head_type]
    path = tmp_path / 'protoseg_config.py'
    path.write_text(RECIPE.format(base=base_name))
    cfg = Config.fromfile(str(path))
    base = load(count_params.resolve_config(base_name))
    head = cfg.model.decode_head
    assert head.type == 'ProtoHead'
    assert plain(head.decoder) == plain(base.model.decode_head)
    assert head.decoder.type == head_type
    assert head.num_classes == base.model.decode_head.num_classes
    # Everything but the decode head is the stock config's.
    cfg_d, base_d = plain(cfg), plain(base)
    for key in SHARED_KEYS:
        assert cfg_d.get(key) == base_d.get(key), key
    model = count_params.build_model(cfg)
    base_model = count_params.build_model(base)
    # Baseline minus its classifier plus two LayerNorms: nothing else moves.
    classifier = count_params.n_params(base_model.decode_head.conv_seg)
    norms = 2 * (head.decoder.channels + head.num_classes)
    assert count_params.n_params(model) == \
        count_params.n_params(base_model) - classifier + norms
    # The auxiliary head, when there is one, stays parametric.
    if getattr(base_model, 'auxiliary_head', None) is not None:
        aux = model.auxiliary_head
        assert type(aux) is type(base_model.auxiliary_head)
        assert hasattr(aux, 'conv_seg')
    train_one_step(model, head.num_classes)


def test_any_config_recipe_keeps_base_in_sync(tmp_path):
    """Options of the stock head reach the decoder; ProtoHead options can be
    added next to it."""
    path = tmp_path / 'protoseg_config.py'
    text = RECIPE.format(base='mmseg::' + STOCK['FCNHead']).replace(
        'decoder={{_base_.model.decode_head}}))',
        'decoder={{_base_.model.decode_head}},\n'
        '        num_prototypes=5))')
    path.write_text(text)
    cfg = Config.fromfile(str(path))
    assert cfg.model.decode_head.num_prototypes == 5
    assert cfg.model.decode_head.decoder.num_convs == 2
    model = count_params.build_model(cfg)
    assert model.decode_head.prototypes.shape == (150, 5, 512)
    # The decoder's own loss is not used; ProtoHead's default losses apply.
    assert [type(m).__name__ for m in model.decode_head.loss_decode] == \
        ['CrossEntropyLoss']
    assert [type(m).__name__ for m in model.decode_head.loss_proto] == \
        ['PixelPrototypeContrastLoss', 'PixelPrototypeDistanceLoss']
