"""Crops around a pixel, with a marker, for the prototype report and pixel explanations."""
import numpy as np


def draw_marker(canvas: np.ndarray, y: int, x: int, radius: int = 3) -> np.ndarray:
    """Mark pixel (y, x) of an RGB image in place: a yellow square in a black one."""
    h, w = canvas.shape[:2]
    for r, colour in ((radius + 1, (0, 0, 0)), (radius, (255, 255, 0))):
        y0, y1, x0, x1 = y - r, y + r, x - r, x + r
        for yy in (y0, y1):
            if 0 <= yy < h:
                canvas[yy, max(x0, 0):min(x1, w - 1) + 1] = colour
        for xx in (x0, x1):
            if 0 <= xx < w:
                canvas[max(y0, 0):min(y1, h - 1) + 1, xx] = colour
    return canvas


def crop_around(image: np.ndarray, y: int, x: int, size: int = 64,
                mark: bool = True) -> np.ndarray:
    """A ``size`` x ``size`` crop of an RGB image centred on (y, x), grey outside it.

    The pixel lands at (size // 2, size // 2), marked when ``mark``.
    """
    h, w = image.shape[:2]
    half = size // 2
    out = np.full((size, size, 3), 128, dtype=np.uint8)
    y0, x0 = y - half, x - half
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + size, h), min(x0 + size, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1, :3]
    return draw_marker(out, half, half) if mark else out


def write_png(path: str, rgb: np.ndarray) -> None:
    """Save an RGB uint8 array as an optimised PNG."""
    from PIL import Image
    Image.fromarray(np.ascontiguousarray(rgb)).save(path, optimize=True)


def read_rgb(path: str) -> np.ndarray:
    """Read an image file as RGB; FileNotFoundError if it cannot be read."""
    import mmcv
    img = mmcv.imread(path, channel_order='rgb')
    if img is None:
        raise FileNotFoundError(f'Cannot read image {path}')
    return img
