"""The package's names: `mmseg_proto.utils` is the utils package, not `models.utils`."""
import importlib
import sys


def test_mmseg_proto_utils_is_not_shadowed_by_models_utils():
    import mmseg_proto
    assert mmseg_proto.utils is sys.modules['mmseg_proto.utils']
    utils = importlib.import_module('mmseg_proto.utils')
    assert callable(utils.load_checkpoint_file) and callable(utils.register_checkpoint_loader)
    assert mmseg_proto.models.utils is sys.modules['mmseg_proto.models.utils']


def test_public_names_are_exported():
    import mmseg_proto
    for name in mmseg_proto.__all__:
        assert hasattr(mmseg_proto, name), name
    assert {'ProtoHead', 'ProtoEncoderDecoder', 'ProtoSegTTAModel'} <= set(mmseg_proto.__all__)
