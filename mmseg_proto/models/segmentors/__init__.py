from .proto_encoder_decoder import ProtoEncoderDecoder, ProtoSegTTAModel

__all__ = ['ProtoEncoderDecoder', 'ProtoSegTTAModel']
