# ProtoSeg: SegFormer (MiT-B4, SegformerHead), paper-matching variant: decoder
# channels=768 as in the original SegFormer (MMSeg uses 256), so the parameter
# count matches the paper's 64.1M -> 64.0M (ADE20K). Otherwise identical to
# protoseg_segformer_mit-b4_8xb1-160k_cityscapes-1024x1024.py.
# Baseline: mmseg::segformer/segformer_mit-b4_8xb1-160k_cityscapes-1024x1024.py
# (whose decoder has channels=256: compare parameters with the "parametric"
# column of tools/analysis_tools/count_params.py, i.e. this model with its classifier back.)
# Paper (Table 2, Cityscapes val mIoU): 80.7 -> 81.3. The paper's SegFormer row
# is MiT-B4.
_base_ = ['./protoseg_segformer_mit-b4_8xb1-160k_cityscapes-1024x1024.py']

model = dict(decode_head=dict(decoder=dict(channels=768)))
