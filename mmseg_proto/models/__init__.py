from . import backbones, decode_heads, losses, segmentors, utils
from .backbones import *  # noqa: F401,F403
from .decode_heads import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .segmentors import *  # noqa: F401,F403
from .utils import *  # noqa: F401,F403

# Only the modules' public names: without __all__, `from .models import *` in the package
# would also bind the subpackage names, and `mmseg_proto.utils` would become this `utils`.
__all__ = [name for module in (backbones, decode_heads, losses, segmentors, utils)
           for name in module.__all__]
