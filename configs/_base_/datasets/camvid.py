# CamVid, 11 classes, 255 = void. Defaults to the subset embedded in this
# repository (data/camvid_mini: 40 train / 20 val frames). For the full split
# set MMSEG_PROTO_CAMVID=/path/to/camvid (img_dir/ + ann_dir/) before loading
# the config, or override train_dataloader.dataset.data_root and
# val_dataloader.dataset.data_root / test_dataloader.dataset.data_root.
# Images are trained at half resolution (240x180) to keep CPU runs short.
dataset_type = 'CamVidDataset'
data_root = '{{$MMSEG_PROTO_CAMVID:{{fileDirname}}/../../../data/camvid_mini}}'
img_scale = (240, 180)
crop_size = (160, 160)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(
        type='RandomResize',
        scale=img_scale,
        ratio_range=(0.75, 1.5),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    # Annotations are loaded after Resize: metrics use full-size labels.
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs')
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
