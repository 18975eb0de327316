"""Shared helpers for the mmseg_proto tests (CPU only)."""
import os
import os.path as osp

import pytest
import torch

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CAMVID_MINI = osp.join(REPO, 'data', 'camvid_mini')
PROTO_CFG = osp.join(
    REPO, 'configs/protoseg/camvid/'
    'protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py')
BASELINE_CFG = osp.join(
    REPO, 'configs/baselines/camvid/'
    'segformer_mit-b0_1xb4-80it_camvid-160x160.py')

os.environ.setdefault('OMP_NUM_THREADS', '2')
torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

import mmseg_proto  # noqa: E402,F401
from mmengine.registry import init_default_scope  # noqa: E402

# Build transforms and models the way a config run does (scope 'mmseg').
init_default_scope('mmseg')


def memoise_mmengine_metafile_lookup():
    """For this test process only: mmengine 0.10 resolves every ``pkg::NAME`` base by reading
    all of the package's model-zoo metafiles (``_get_cfg_metainfo``; for mmseg 53 YAML files,
    0.12 s a lookup on average on the 2-core Intel Xeon), with no cache, and fails over to the
    base path only after that search: 388 lookups took 46 s of the suite (measured). The
    answers depend only on the installed files, which no test changes, so the suite reads
    each (package folder, name) once; the answer, or the ValueError mmengine raises, is
    mmengine's own (tests/test_utils/test_config_scope.py compares the two)."""
    import copy

    from mmengine.config import utils as config_utils
    original = getattr(config_utils, '_get_cfg_metainfo', None)
    if original is None or hasattr(original, 'uncached'):
        return
    answers = {}

    def cfg_metainfo(*args, **kwargs):  # whatever mmengine passes, passed on as it is
        key = (args, tuple(sorted(kwargs.items())))
        try:
            hash(key)
        except TypeError:  # not a lookup this memo knows: mmengine's own answer
            return original(*args, **kwargs)
        if key not in answers:
            try:
                answers[key] = (original(*args, **kwargs), None)
            except ValueError as err:
                answers[key] = (None, str(err))
        found, error = answers[key]
        if error is not None:
            raise ValueError(error)
        return copy.deepcopy(found)

    cfg_metainfo.uncached = original
    config_utils._get_cfg_metainfo = cfg_metainfo


memoise_mmengine_metafile_lookup()


def without_validation(cfg):
    """``cfg`` with no validation loop. mmengine's IterBasedTrainLoop validates after the last
    iteration whatever ``val_interval`` says (here all 20 bundled val images at 240 x 180,
    most of a short training's time); trainings whose tests read weights only skip it."""
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    return cfg


def train_camvid_protoseg(work_dir, iters, crop=64, batch_size=1, seed=None):
    """Train the shipped CamVid ProtoSeg config for ``iters`` iterations on ``crop`` x ``crop``
    crops of the bundled images, without validation; returns (checkpoint path, the runner's
    model)."""
    from mmengine.config import Config
    from mmengine.runner import Runner
    cfg = Config.fromfile(PROTO_CFG)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = iters
    without_validation(cfg)
    cfg.default_hooks.checkpoint.interval = iters
    cfg.default_hooks.logger.interval = iters
    cfg.model.data_preprocessor.size = (crop, crop)
    cfg.train_dataloader.batch_size = batch_size
    for t in cfg.train_dataloader.dataset.pipeline:
        if t['type'] == 'RandomCrop':
            t['crop_size'] = (crop, crop)
    if seed is not None:
        cfg.randomness = dict(seed=seed)
        cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    runner = Runner.from_cfg(cfg)
    runner.train()
    return osp.join(str(work_dir), f'iter_{iters}.pth'), runner.model


@pytest.fixture(scope='session')
def camvid_protoseg(tmp_path_factory):
    """(checkpoint, its trained prototypes) of ``train_camvid_protoseg(iters=2)`` (64 x 64
    crops): one short ProtoSeg training of the shipped CamVid config, trained once per test
    session for every module that only reads such a checkpoint (inference, export, add-class,
    galleries, tools). Tests that change a checkpoint work on a copy; the teardown checks
    that the file is unchanged."""
    import hashlib
    ckpt, model = train_camvid_protoseg(tmp_path_factory.mktemp('camvid_protoseg'), iters=2)
    with open(ckpt, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    yield ckpt, model.decode_head.prototypes.detach().clone()
    with open(ckpt, 'rb') as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest, f'a test changed {ckpt}'


def make_head(num_classes=4, channels=8, num_prototypes=3, **kwargs):
    """A ProtoHead on an FCNHead decoder that passes features through."""
    import mmseg_proto  # noqa: F401
    from mmseg.registry import MODELS
    cfg = dict(
        type='ProtoHead',
        num_classes=num_classes,
        num_prototypes=num_prototypes,
        decoder=dict(
            type='FCNHead',
            in_channels=channels,
            channels=channels,
            num_convs=0,
            concat_input=False,
            dropout_ratio=0.0,
            in_index=0))
    cfg.update(kwargs)
    return MODELS.build(cfg)


def take_statistics(head):
    """What the head's last ``loss`` handed its bank (sums, counts, usage), as the bank would
    apply them on one process; the bank is left empty (the next ``loss`` may run)."""
    from mmseg_proto.models.utils.prototype_statistics import PrototypeStatistics
    assert head.bank.accumulate(), 'no loss since the last take'
    stats = PrototypeStatistics.from_state_dict(head.bank.resume_state()['pending'], 'cpu')
    head.bank.discard()
    return stats


def hand_ema(protos, sums, counts, momentum):
    """p <- normalise(mu * p + (1 - mu) * normalise(sum)) where count > 0, by hand."""
    c, k, d = protos.shape
    out = protos.reshape(c * k, d).clone()
    for i in range(c * k):
        if counts[i] > 0:
            mean = sums[i] / sums[i].norm()
            new = momentum * out[i] + (1 - momentum) * mean
            out[i] = new / new.norm()
    return out.view(c, k, d)


def tensor_values(tree, path=''):
    """{path: values} of the tensors in nested dicts (None where there is none), to compare
    two saved states with ``==``."""
    if isinstance(tree, dict):
        return {k: v for key in sorted(tree)
                for k, v in tensor_values(tree[key], f'{path}/{key}').items()}
    return {path: None if tree is None else tree.tolist()}


def make_samples(labels):
    """SegDataSamples from a (B, H, W) int tensor of labels."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    samples = []
    for lab in labels:
        s = SegDataSample()
        s.gt_sem_seg = PixelData(data=lab[None].long())
        s.set_metainfo(dict(img_shape=tuple(lab.shape),
                            ori_shape=tuple(lab.shape),
                            pad_shape=tuple(lab.shape)))
        samples.append(s)
    return samples


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    yield
