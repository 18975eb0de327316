"""The loader's two errors and the wording every refusal shares."""
import pickle
from typing import NoReturn, Optional

REFUSED = 'mmseg_proto refused to load this checkpoint'
ADMITTED = ('tensors, numpy arrays and scalars of bool, integer, float, complex and string '
            'dtypes, and mmengine HistoryBuffer logs')
NEVER_UNSAFE = ('do not load it with torch.load(weights_only=False), which runs whatever '
                'a file names, unless you made the file yourself')
#: The explicit opt-in: SHA-256 digests of files to load with torch's full unpickler.
TRUSTED_VARIABLE = 'MMSEG_PROTO_TRUSTED_CHECKPOINTS'
TRUSTED_DOC = 'docs/install.md, "Trusted checkpoints"'
#: The torch versions the loader supports, and the one this release is tested with
#: (requirements/constraints.txt).
SUPPORTED_TORCH = ('mmseg_proto\'s loader runs on torch >= 2.4 whose private unpickling loop '
                   'passes its import check, and is tested with torch 2.13.0, the version '
                   'requirements/constraints.txt pins')
INSTALL_PIN = '`pip install -c requirements/constraints.txt torch`'


class CheckpointRefusedError(pickle.UnpicklingError):
    """A checkpoint holding something the loader does not admit (the message says what).

    Attributes:
        honest (bool): Whether an honest file may hold what was refused (another class, a
            pickle protocol other than 2); False for what no ``torch.save`` writes.
        opcode (int, optional): The pickle opcode torch's unpickler does not read, if that
            was the refusal.
    """

    def __init__(self, message: str, honest: bool = False,
                 opcode: Optional[int] = None) -> None:
        super().__init__(message)
        self.honest, self.opcode = honest, opcode


class UnreadableCheckpointError(RuntimeError):
    """A file that is not a checkpoint ``torch.save`` wrote, or one that is cut short."""


def crafted(what: str) -> str:
    """The refusal of what no ``torch.save`` of admitted data writes."""
    return (f'{REFUSED}: {what}. No torch.save of {ADMITTED} writes this: the file is damaged '
            f'or was crafted; {NEVER_UNSAFE}.')


def unsupported(what: str, advice: str) -> str:
    """The refusal of a value an honest file may hold but this loader does not admit."""
    return (f'{REFUSED}: {what}, which this loader does not admit (it admits {ADMITTED}). '
            f'{advice}')


def refuse(what: str) -> NoReturn:
    """Refuse what no ``torch.save`` of admitted data writes: a damaged or crafted file."""
    raise CheckpointRefusedError(crafted(what))
