from .proto_encoder_decoder import ProtoEncoderDecoder

__all__ = ['ProtoEncoderDecoder']
