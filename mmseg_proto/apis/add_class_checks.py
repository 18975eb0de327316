"""Refusing bad input to :func:`~mmseg_proto.apis.add_classes.add_classes`: the error it
raises and the checks of its options, class names, support lists and palette.

Each check raises :class:`AddClassError` with one message that says what to change. The
support images and masks themselves are checked where they are read
(``support_images.py``), the decode head where it is adapted (``head_adapters.py``).
"""
from typing import Any, List, Optional, Sequence

import numpy as np


class AddClassError(ValueError):
    """A support image, mask, name or model that cannot add a class; says what to change."""


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (Python or NumPy), a bool not counting as one."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_options(refine_steps: Any, refine_lr: Any, num_prototypes: Any) -> None:
    """AddClassError unless ``refine_steps`` is an integer >= 0, ``refine_lr`` a number in
    (0, 1] and ``num_prototypes`` None or an integer >= 1.

    Args:
        refine_steps: ``add_classes``' refine_steps.
        refine_lr: ``add_classes``' refine_lr.
        num_prototypes: ``add_classes``' num_prototypes (the upper bound, the head's K, is
            checked once the head is known).
    """
    if not (is_int(refine_steps) and refine_steps >= 0):
        raise AddClassError(f'refine_steps={refine_steps!r}: give an integer >= 0')
    if not (isinstance(refine_lr, (int, float)) and not isinstance(refine_lr, bool)
            and 0 < refine_lr <= 1):
        raise AddClassError(f'refine_lr={refine_lr!r}: give a number in (0, 1] (Adam moves '
                            'each parameter by about lr per step: above 1 the unit '
                            'prototypes and offsets jump anywhere)')
    if num_prototypes is not None and not (is_int(num_prototypes) and num_prototypes >= 1):
        raise AddClassError(f'num_prototypes={num_prototypes!r}: give an integer >= 1 (at '
                            "most the head's K)")


def check_names(names: List[str], classes: List[str], num_classes: Optional[int],
                num_supports: int) -> None:
    """AddClassError unless the new class ``names`` are non-empty strings without outer
    spaces, none already a class, one per support list, and the model names its classes.

    Args:
        names (list[str]): The new classes' names.
        classes (list[str]): The model's classes (its ``dataset_meta['classes']``).
        num_classes (int, optional): The decode head's class count, if it has one.
        num_supports (int): How many support lists were given.
    """
    if not names:
        raise AddClassError('give at least one class name')
    if num_supports != len(names):
        raise AddClassError(f'{num_supports} support lists for {len(names)} class names: '
                            'give one list of (image, mask) pairs per name')
    if not classes:
        raise AddClassError("the model's dataset_meta names no classes: load a checkpoint "
                            "that has them, or set model.dataset_meta = dict(classes=..., "
                            'palette=...) first')
    if num_classes is not None and len(classes) != num_classes:
        raise AddClassError(f"the model's dataset_meta names {len(classes)} classes but its "
                            f'head has {num_classes}')
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise AddClassError(f'class name {name!r}: give a non-empty string without '
                                'leading or trailing spaces')
        if name in classes or name in names[:i]:
            raise AddClassError(f'{name!r} is already a class of this model; give another '
                                'name')


def check_supports(names: List[str], supports: Sequence[Any]) -> None:
    """AddClassError unless each class's support is a non-empty list of (image, mask)
    pairs (the files are read and checked later, by ``read_support``).

    Args:
        names (list[str]): The new classes' names.
        supports (Sequence): For each name, its support list.
    """
    for name, support in zip(names, supports):
        if isinstance(support, (str, np.ndarray)) or not len(support) or not all(
                isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in support):
            raise AddClassError(f'class {name!r}: its support must be a non-empty list of '
                                '(image, mask) pairs')


def check_palette(palette: Sequence[Sequence[int]], n: int) -> None:
    """AddClassError unless ``palette`` is ``n`` RGB colours of 3 integers in [0, 255].

    Args:
        palette (Sequence[Sequence[int]]): One colour per new class.
        n (int): The number of new classes.
    """
    if isinstance(palette, str) or len(palette) != n:
        raise AddClassError(f'palette {palette!r}: give {n} colour(s), one per new class')
    for colour in palette:
        if isinstance(colour, str) or len(colour) != 3 or not all(
                is_int(v) and 0 <= v <= 255 for v in colour):
            raise AddClassError(f'palette colour {colour!r}: give 3 integers in [0, 255] '
                                '(R, G, B)')
