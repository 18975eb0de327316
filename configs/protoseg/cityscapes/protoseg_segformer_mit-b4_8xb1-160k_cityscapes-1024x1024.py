# ProtoSeg: SegFormer (MiT-B4, SegformerHead) with nonparametric prototypes
# (K=10, mu=0.999, CE + 0.01 PPC + 0.001 PPD), same data, schedule and
# optimizer as the baseline.
# Baseline: mmseg::segformer/segformer_mit-b4_8xb1-160k_cityscapes-1024x1024.py
# Paper (Table 2, Cityscapes val mIoU): 80.7 -> 81.3. The paper's SegFormer row
# is MiT-B4.
# Variant: MMSeg's SegformerHead (channels=256). The original SegFormer uses
# 768: see protoseg_segformer-c768_mit-b4_8xb1-160k_cityscapes-1024x1024.py.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['mmseg::segformer/segformer_mit-b4_8xb1-160k_cityscapes-1024x1024.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=19,
                              decoder={{_base_.model.decode_head}}))
