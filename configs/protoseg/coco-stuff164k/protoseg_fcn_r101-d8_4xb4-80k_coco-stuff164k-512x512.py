# ProtoSeg: FCN (ResNet-101-D8, FCNHead) with nonparametric prototypes (K=10,
# mu=0.999, CE + 0.01 PPC + 0.001 PPD), same data, schedule and optimizer as
# the baseline.
# Baseline: configs/baselines/coco-stuff164k/fcn_r101-d8_4xb4-80k_coco-stuff164k-512x512.py
# (MMSeg has no config for this combination; the baseline is composed from
# MMSeg _base_ model/dataset/schedule files, see its header.)
# Paper (Table 3, COCO-Stuff test mIoU): 32.5 -> 34.0.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['../../baselines/coco-stuff164k/fcn_r101-d8_4xb4-80k_coco-stuff164k-512x512.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=171,
                              decoder={{_base_.model.decode_head}}))
