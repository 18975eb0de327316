# ProtoSeg with SegFormer MiT-B2 on ADE20K, the paper's ablation setting:
# 160k iterations, batch 16 (8 GPUs x 2), crop 512x512, AdamW as MMSeg's
# SegFormer recipe, K=10 prototypes per class, momentum 0.999, PPC 0.01,
# PPD 0.001. Paper (Table 5, MiT-B2, all losses): 46.4 mIoU.
# Baseline: mmseg::segformer/segformer_mit-b2_8xb2-160k_ade20k-512x512.py
# The settings live in the grouped model-zoo config it inherits (which itself
# inherits the baseline above); this file is a short name for it:
#   mim train mmsegmentation configs/proto_segformer_b2.py
#   mim train mmsegmentation configs/proto_segformer_b2.py \
#       --launcher pytorch --gpus 8
_base_ = ['./protoseg/ade20k/protoseg_segformer_mit-b2_8xb2-160k_ade20k-512x512.py']
