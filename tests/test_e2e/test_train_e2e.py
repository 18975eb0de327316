"""End to end: MMEngine's Runner trains, saves, resumes and evaluates."""
import os.path as osp

import pytest
import torch
from conftest import BASELINE_CFG, PROTO_CFG
from mmengine.config import Config
from mmengine.runner import CheckpointLoader, Runner


def small_cfg(path, work_dir, max_iters, ckpt_interval, **extra):
    cfg = Config.fromfile(path)
    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = max_iters
    cfg.train_cfg.val_interval = max_iters
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0,
             end=3)
    ]
    cfg.default_hooks.checkpoint.interval = ckpt_interval
    cfg.default_hooks.logger.interval = 5
    cfg.train_dataloader.batch_size = 2
    cfg.val_dataloader.dataset.indices = 6  # first 6 val images
    cfg.test_dataloader = cfg.val_dataloader
    cfg.merge_from_dict(extra)
    return cfg


def proto_head(runner):
    return runner.model.decode_head


def test_protohead_trains_resumes_and_evaluates(tmp_path):
    cfg = small_cfg(PROTO_CFG, tmp_path, max_iters=30, ckpt_interval=15)
    runner = Runner.from_cfg(cfg)
    start = proto_head(runner).prototypes.clone()
    runner.train()
    head = proto_head(runner)
    losses = runner.message_hub.get_scalar('train/loss')._log_history
    assert len(losses) >= 30
    assert losses[-5:].mean() < losses[:5].mean()
    # Prototypes moved, stayed unit norm and finite.
    assert not torch.equal(head.prototypes, start)
    torch.testing.assert_close(head.prototypes.norm(dim=-1),
                               torch.ones(11, 10))
    # The validation mmengine runs after the last iteration (val_interval = 30): better than
    # the all-one-class answers the untrained head gives (the bundled val images: most
    # frequent class ~25% of the pixels).
    assert runner.message_hub.get_scalar('val/aAcc').current() > 30.0
    assert osp.exists(tmp_path / 'iter_30.pth')
    trained = head.prototypes.clone()

    # The checkpoint holds the prototypes and resumes (torch >= 2.6 loading).
    ckpt = CheckpointLoader.load_checkpoint(
        str(tmp_path / 'iter_30.pth'), map_location='cpu')
    assert torch.equal(ckpt['state_dict']['decode_head.prototypes'], trained)
    cfg2 = small_cfg(PROTO_CFG, tmp_path / 'resumed', max_iters=33,
                     ckpt_interval=33, resume=True,
                     load_from=str(tmp_path / 'iter_30.pth'))
    runner2 = Runner.from_cfg(cfg2)
    runner2.train()
    assert runner2.iter == 33
    assert osp.exists(tmp_path / 'resumed' / 'iter_33.pth')
    assert not torch.equal(proto_head(runner2).prototypes, trained)
    # The resumed run validated after its last iteration (val_interval = 33), in this run.
    assert len(runner2.message_hub.get_scalar('val/mIoU')._log_history) == 1


def test_baseline_config_trains(tmp_path):
    cfg = small_cfg(BASELINE_CFG, tmp_path, max_iters=2, ckpt_interval=2)
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert osp.exists(tmp_path / 'iter_2.pth')


def test_training_without_hook_fails_clearly(tmp_path):
    cfg = small_cfg(PROTO_CFG, tmp_path, max_iters=3, ckpt_interval=3)
    cfg.custom_hooks = []
    runner = Runner.from_cfg(cfg)
    with pytest.raises(RuntimeError, match='custom_hooks'):
        runner.train()


def _sample(h, w, flip=False):
    from mmseg.structures import SegDataSample
    s = SegDataSample()
    s.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                        flip=flip, img_path='frame.jpg',
                        flip_direction='horizontal' if flip
                        else None))
    return s


def test_whole_slide_and_tta_inference_with_protohead():
    from mmengine.config import ConfigDict
    from mmseg.registry import MODELS
    cfg = Config.fromfile(PROTO_CFG)
    model = MODELS.build(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(3, 120, 160, generator=g) * 255).to(torch.uint8)
    preds = {}
    for mode in ('whole', 'slide'):
        model.test_cfg = ConfigDict(mode=mode, crop_size=(96, 96),
                                    stride=(64, 64))
        with torch.no_grad():
            out = model.test_step(
                dict(inputs=[img], data_samples=[_sample(120, 160)]))
        assert out[0].seg_logits.data.shape == (11, 120, 160)
        assert out[0].pred_sem_seg.data.shape == (1, 120, 160)
        preds[mode] = out[0].pred_sem_seg.data
    # SegTTAModel: original + flipped view, merged.
    model.test_cfg = ConfigDict(mode='whole')
    tta = MODELS.build(dict(type='SegTTAModel', module=model))
    with torch.no_grad():
        out = tta.test_step(
            dict(inputs=[[img], [img.flip(-1)]],
                 data_samples=[[_sample(120, 160)],
                               [_sample(120, 160, flip=True)]]))
    assert out[0].pred_sem_seg.data.shape == (1, 120, 160)
    assert int(out[0].pred_sem_seg.data.max()) < 11
