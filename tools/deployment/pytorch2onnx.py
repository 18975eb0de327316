"""Export an MMSeg segmentor (ProtoSeg or parametric) to ONNX, and check it with ONNX Runtime.

The graph takes a float32 image batch (B, 3, H, W) as MMSeg's LoadImageFromFile gives it (BGR,
0-255; ``cv2.imread(path)[None].transpose(0, 3, 1, 2).astype('float32')``) and computes what
MMSeg's test path computes on it: the config's SegDataPreProcessor (the channel flip of
``bgr_to_rgb=True`` / ``rgb_to_bgr=True``, mean, std), the model on the whole image, and the
bilinear resize of the logits to the input size with the decode head's ``align_corners``. It
returns the segmentation logits ``seg_logits`` (B, C, H, W) (``argmax(1)`` is the prediction)
and, for a ``ProtoEncoderDecoder`` with ``anomaly_map=True``, the anomaly map ``anomaly_map``
(B, 1, H, W). Only the inference path is exported: for a ProtoHead the running max over K
slabs of C prototypes, never the (pixels x C*K) similarity matrix of training.

    python tools/deployment/pytorch2onnx.py CONFIG CHECKPOINT --out model.onnx \
        [--shape H W] [--dynamic] [--exporter torchscript|dynamo] [--verify IMAGE ...] \
        [--force]

The config may inherit ours through ``mmseg_proto::``. ``--dynamic`` makes batch, height and
width dynamic, with the dynamo exporter (the default then; the TorchScript exporter's dynamic
graph fails in ONNX Runtime at other sizes, so that combination is refused). ``--verify`` runs
ONNX Runtime on the images (resized to --shape unless --dynamic) and prints the largest logit
difference from MMSeg's own inference (its data preprocessor, then ``test_step``) and the share
of pixels with the same argmax.

Every parameter and buffer of the model comes from the checkpoint: a checkpoint that lacks
one, has one in another shape (another class count) or holds NaN is refused by name. A
ProtoHead's prototypes are the checkpoint's whatever ``load_prototypes`` says.

``--out`` is never the config, the checkpoint or an image of the run (under any spelling or
link); an existing file there is replaced only if it is an ONNX model, or with ``--force``.
An export too small for the model (``--shape 1 1``) is refused with the smallest size it
accepts.
"""
import argparse
from typing import Optional, Sequence

from mmseg_proto.utils.onnx_export import (ExportError, check_output_path, compare, export,
                                           listed_names, load)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Export CONFIG/CHECKPOINT to --out (see the module docstring).

    Args:
        argv (Sequence[str], optional): The command line without the program name.
            Default: ``sys.argv[1:]``.

    Returns:
        dict: With --verify, ``max_abs_diff`` and ``argmax_agreement`` (:func:`compare`);
        else empty.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('config')
    p.add_argument('checkpoint')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--shape', type=int, nargs=2, default=(512, 512), metavar=('H', 'W'),
                   help='input size of the export (and of --verify without --dynamic)')
    p.add_argument('--dynamic', action='store_true',
                   help='dynamic batch, height, width (dynamo exporter)')
    p.add_argument('--exporter', choices=('torchscript', 'dynamo'), default=None,
                   help='default: torchscript, or dynamo with --dynamic')
    p.add_argument('--opset', type=int, default=18)
    p.add_argument('--verify', nargs='*', default=[], metavar='IMAGE',
                   help='images to compare ONNX Runtime with PyTorch on')
    p.add_argument('--force', action='store_true',
                   help='replace an existing --out that is not an ONNX model')
    args = p.parse_args(argv)
    if args.dynamic and args.exporter == 'torchscript':
        p.error('--dynamic needs --exporter dynamo (the default with --dynamic): the '
                "TorchScript exporter freezes the sizes MMSeg's MixVisionTransformer computes "
                'in Python, and its dynamic graph fails in ONNX Runtime at any other size')
    if args.exporter is None:
        args.exporter = 'dynamo' if args.dynamic else 'torchscript'
        if args.dynamic:
            print('pytorch2onnx: --dynamic: using the dynamo exporter (the TorchScript '
                  "exporter's dynamic graph fails in ONNX Runtime at other sizes)")
    try:
        check_output_path(args.out, dict(config=args.config, checkpoint=args.checkpoint,
                                         image=args.verify), args.force)
    except ExportError as err:
        p.error(str(err))
    import mmcv
    try:  # a checkpoint that does not fit the config, a model the graph cannot reproduce
        module = load(args.config, args.checkpoint)
        export(module, args.out, args.shape, args.dynamic, args.exporter, args.opset)
    except ExportError as err:  # ... or a --shape too small for the model
        p.error(str(err))
    for note in module.notes():
        print(f'pytorch2onnx: note: {note}')
    if module.unused_keys:
        print(f'pytorch2onnx: {len(module.unused_keys)} tensor(s) of the checkpoint are not '
              f'part of this config\'s model and not exported: {listed_names(module.unused_keys)}')
    print(f'wrote {args.out} ({args.exporter} exporter, '
          f"{'dynamic' if args.dynamic else 'static'} shape {tuple(args.shape)}; outputs "
          f"{', '.join(module.output_names)})")
    if not args.verify:
        return {}
    images = [mmcv.imread(path) for path in args.verify]
    if not args.dynamic:
        images = [mmcv.imresize(img, tuple(args.shape[::-1])) for img in images]
    result = compare(module, args.out, images)
    anomaly = (f", anomaly map max |difference| {result['anomaly_max_abs_diff']:.2e}"
               if 'anomaly_max_abs_diff' in result else '')
    print(f"ONNX Runtime vs MMSeg's own inference on {len(images)} image(s): max |logit "
          f"difference| {result['max_abs_diff']:.2e}, same argmax on "
          f"{100 * result['argmax_agreement']:.4f}% of pixels{anomaly}")
    return result


if __name__ == '__main__':
    main()
