"""EncoderDecoder that can also return ProtoHead's per-pixel anomaly map."""
from typing import List

from mmseg.models.segmentors import EncoderDecoder
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
    padding removed, flipped back, resized bilinearly to the original size). Test-time
    augmentation (``SegTTAModel``) merges only the logits: no anomaly map there.

    With ``anomaly_map=False`` (default) it is ``EncoderDecoder``, output for output.

    To switch it on for a ProtoSeg config (no retraining; the checkpoint loads as it is)::

        model = dict(type='ProtoEncoderDecoder', anomaly_map=True)

    or ``init_model(cfg, ckpt, cfg_options={'model.type': 'ProtoEncoderDecoder',
    'model.anomaly_map': True})``.

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
        data_samples = super().postprocess_result(seg_logits, data_samples)
        for sample in data_samples:
            stacked = sample.seg_logits.data
            logits = stacked[:num_classes]
            sample.set_data(dict(
                seg_logits=PixelData(data=logits),
                pred_sem_seg=PixelData(data=logits.argmax(dim=0, keepdim=True)),
                anomaly_map=PixelData(data=stacked[num_classes:])))
        return data_samples
