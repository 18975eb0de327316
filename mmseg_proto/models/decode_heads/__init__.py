from .proto_head import ProtoHead

__all__ = ['ProtoHead']
