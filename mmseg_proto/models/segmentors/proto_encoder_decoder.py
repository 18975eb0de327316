"""EncoderDecoder that can also return ProtoHead's per-pixel anomaly map, and the test-time
augmentation model that merges those maps."""
import warnings
from typing import List

import torch
from mmseg.models.segmentors import EncoderDecoder, SegTTAModel
from mmseg.registry import MODELS
from mmseg.utils import OptSampleList, SampleList
from mmengine.structures import PixelData
from torch import Tensor


@MODELS.register_module()
class ProtoEncoderDecoder(EncoderDecoder):
    """MMSeg's ``EncoderDecoder`` with an optional prototype anomaly map.

    With ``anomaly_map=True`` every prediction (``predict``, so ``mmseg.apis.inference_model``,
    ``MMSegInferencer``, ``tools/test.py``) also carries ``anomaly_map``: a ``PixelData`` of shape
    (1, H, W) at the image's original size, float, higher = more anomalous. The score is
    ``1 - max cosine similarity`` of the pixel's embedding to any prototype of any class, taken
    before the LayerNorm over classes (see ``ProtoHead.predict_with_anomaly``). It goes through
    whole and slide inference exactly as the logits do (averaged over overlapping windows,
    padding removed, flipped back, resized bilinearly to the original size).

    Test-time augmentation: :class:`ProtoSegTTAModel` (``tta_model =
    dict(type='ProtoSegTTAModel')``) averages the passes' maps, each flipped back and at the
    original size. MMSeg's ``SegTTAModel`` would return the map of its last pass only, so a
    flipped pass (a sample whose metainfo has ``flip``, which only MMSeg's TTA pipelines set at
    test time) outside :class:`ProtoSegTTAModel` has no ``anomaly_map``, with a warning.

    With ``anomaly_map=False`` (default) it is ``EncoderDecoder``, output for output.

    To switch it on for a ProtoSeg config (no retraining; the checkpoint loads as it is)::

        model = dict(type='ProtoEncoderDecoder', anomaly_map=True)

    or ``init_model(cfg, ckpt, cfg_options={'model.type': 'ProtoEncoderDecoder',
    'model.anomaly_map': True})``; for ``tools/test.py --tta`` add
    ``tta_model.type=ProtoSegTTAModel`` to ``--cfg-options``.

    Args:
        anomaly_map (bool): Add the anomaly map to every prediction. Default: False.
        **kwargs: ``EncoderDecoder``'s arguments (backbone, decode_head, ...).
    """

    def __init__(self, anomaly_map: bool = False, **kwargs) -> None:
        if not isinstance(anomaly_map, bool):
            raise TypeError(f'ProtoEncoderDecoder: anomaly_map={anomaly_map!r} must be True '
                            'or False')
        super().__init__(**kwargs)
        self.anomaly_map = anomaly_map
        # True only while ProtoSegTTAModel runs its passes (it merges their maps).
        self.merging_tta_passes = False
        if anomaly_map:
            if not hasattr(self.decode_head, 'predict_with_anomaly'):
                raise TypeError(
                    'ProtoEncoderDecoder: anomaly_map=True needs a prototype decode head '
                    f"(type='ProtoHead'), got {type(self.decode_head).__name__}; set "
                    'anomaly_map=False or use a ProtoSeg config')
            # Slide inference stitches C logits + 1 anomaly channel.
            self.out_channels = self.decode_head.out_channels + 1

    def encode_decode(self, inputs: Tensor, batch_img_metas: List[dict]) -> Tensor:
        """Logits (B, C, H, W), or with ``anomaly_map`` (B, C + 1, H, W), at the input size."""
        if not self.anomaly_map:
            return super().encode_decode(inputs, batch_img_metas)
        return self.decode_head.predict_with_anomaly(self.extract_feat(inputs), batch_img_metas,
                                                     self.test_cfg)

    def postprocess_result(self, seg_logits: Tensor,
                           data_samples: OptSampleList = None) -> SampleList:
        """MMSeg's post-processing (padding, flip, resize to the original size) of the logits
        and the anomaly channel together; then the anomaly channel becomes ``anomaly_map``."""
        if not self.anomaly_map:
            return super().postprocess_result(seg_logits, data_samples)
        num_classes = seg_logits.shape[1] - 1
        keep_map = self._keep_anomaly_map(data_samples)
        data_samples = super().postprocess_result(seg_logits, data_samples)
        for sample in data_samples:
            stacked = sample.seg_logits.data
            logits = stacked[:num_classes]
            sample.set_data(dict(
                seg_logits=PixelData(data=logits),
                pred_sem_seg=PixelData(data=logits.argmax(dim=0, keepdim=True))))
            if keep_map:
                sample.set_data(dict(anomaly_map=PixelData(data=stacked[num_classes:])))
        return data_samples

    def _keep_anomaly_map(self, data_samples: OptSampleList) -> bool:
        """False, with a warning, for a test-time-augmentation pass no merging model runs."""
        flipped = data_samples is not None and any(
            'flip' in sample.metainfo for sample in data_samples)
        if not flipped or self.merging_tta_passes:
            return True
        warnings.warn(
            'ProtoEncoderDecoder: no anomaly_map for a test-time flip pass (test-time '
            "augmentation): MMSeg's SegTTAModel would keep the map of its last pass only. "
            "Use tta_model = dict(type='ProtoSegTTAModel'), which averages the maps of all "
            'passes (flipped back), or a test pipeline without RandomFlip',
            stacklevel=2)
        return False


@MODELS.register_module()
class ProtoSegTTAModel(SegTTAModel):
    """MMSeg's ``SegTTAModel`` that also merges the anomaly maps of its passes.

    The prediction is MMSeg's (the mean of the passes' softmax, its argmax). With a
    :class:`ProtoEncoderDecoder` with ``anomaly_map=True`` inside, the merged result's
    ``anomaly_map`` is the mean of the passes' maps, each already flipped back and resized to
    the original image size by the segmentor (as MMSeg treats the logits). With any other
    segmentor it is ``SegTTAModel``, output for output.

    Use it in a config as ``tta_model = dict(type='ProtoSegTTAModel')`` (MMSeg's ``--tta``
    then wraps ``model`` in it).
    """

    def test_step(self, data):
        """MMSeg's test step; the segmentor keeps each pass's anomaly map for the merge."""
        if not isinstance(self.module, ProtoEncoderDecoder):
            return super().test_step(data)
        self.module.merging_tta_passes = True
        try:
            return super().test_step(data)
        finally:
            self.module.merging_tta_passes = False

    def merge_preds(self, data_samples_list: List[SampleList]) -> SampleList:
        """MMSeg's merge, then ``anomaly_map``: the mean over the passes of each image.

        Args:
            data_samples_list (List[SampleList]): Per image, the predictions of its passes.
        """
        merged = super().merge_preds(data_samples_list)
        for sample, passes in zip(merged, data_samples_list):
            maps = [p.anomaly_map.data for p in passes if 'anomaly_map' in p]
            if not maps:
                continue
            if len(maps) != len(passes):
                raise RuntimeError(
                    f'ProtoSegTTAModel: {len(maps)} of the {len(passes)} passes of '
                    f"{sample.metainfo.get('img_path')} have an anomaly_map; cannot merge")
            sample.set_data(dict(anomaly_map=PixelData(data=torch.stack(maps).mean(dim=0))))
        return merged
