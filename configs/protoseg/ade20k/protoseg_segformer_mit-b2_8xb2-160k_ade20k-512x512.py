# ProtoSeg: SegFormer (MiT-B2, SegformerHead) with nonparametric prototypes
# (K=10, mu=0.999, CE + 0.01 PPC + 0.001 PPD), same data, schedule and
# optimizer as the baseline.
# Baseline: mmseg::segformer/segformer_mit-b2_8xb2-160k_ade20k-512x512.py
# Paper (Table 1, ADE20K val mIoU): 50.9 -> 51.7. The paper's SegFormer rows
# use MiT-B4 (64.1M params); MiT-B2 is its ablation model (ADE20K: 46.4 with
# all losses, Table 5).
# Variant: MMSeg's SegformerHead (channels=256). The original SegFormer uses
# 768: override with model.decode_head.decoder.channels=768.
# projection='none': the model is the baseline minus its classifier plus two
# LayerNorms (feat_norm, mask_norm); tools/analysis_tools/count_params.py prints the counts.
_base_ = ['mmseg::segformer/segformer_mit-b2_8xb2-160k_ade20k-512x512.py', '../../_base_/protoseg_runtime.py']
model = dict(decode_head=dict(_delete_=True, type='ProtoHead', num_classes=150,
                              decoder={{_base_.model.decode_head}}))
