#!/usr/bin/env python
"""Convert the ProtoSeg authors' openseg checkpoint to an MMSeg checkpoint.

Usage::

    python tools/model_converters/convert_openseg_protoseg.py \
        hrnet_w48_proto_lr1x_hrnet_proto_80k_latest.pth converted.pth

The mapping lives in :mod:`mmseg_proto.utils.convert_openseg`. SRC is loaded
through the package's safe loader (:mod:`mmseg_proto.utils.checkpoint_loading`):
a file that is not a checkpoint, or an mmengine checkpoint (which needs no
conversion), is named as such.
"""
import argparse
import os.path as osp
import sys

from mmseg_proto.utils.convert_openseg import (DEFAULT_CONFIG,
                                               OpensegConversionError,
                                               convert_file)
from mmseg_proto.utils.output_files import OutputPathError, check_output_file


def parse_args() -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(
        description="Convert the ProtoSeg authors' openseg checkpoint "
        '(tfzhou/ProtoSeg, HRNet-W48 Cityscapes) to an MMSeg checkpoint')
    parser.add_argument('src', help='openseg checkpoint (.pth)')
    parser.add_argument('dst', help='output MMSeg checkpoint (.pth); never SRC or the '
                        'config, and an existing file only if this converter wrote it')
    parser.add_argument(
        '--config',
        default=DEFAULT_CONFIG,
        help='MMSeg config whose model the checkpoint must fit '
        '(default: %(default)s)')
    parser.add_argument(
        '--trust-pickle',
        action='store_true',
        help="if the package's safe loader refuses objects in SRC, load it "
        'with torch.load(weights_only=False), which runs whatever the file '
        'names; only for files you trust')
    return parser.parse_args()


def main() -> int:
    """Run the conversion; exit status 1 with a message on failure."""
    args = parse_args()
    try:  # DST is never SRC or the config, nor a file this converter did not write
        out = check_output_file(args.dst, 'convert_openseg_protoseg',
                                dict(source=args.src, config=args.config), option='DST')
        with out.atomic(osp.basename(args.dst)) as tmp:  # no half file on failure
            convert_file(args.src, tmp, args.config, args.trust_pickle,
                         log=lambda line: print(line.replace(tmp, args.dst)))
    except (OpensegConversionError, OutputPathError, FileNotFoundError) as err:
        text, prefix = str(err), 'convert_openseg_protoseg: '
        text = text[len(prefix):] if text.startswith(prefix) else text
        print(f'convert_openseg_protoseg: error: {text}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
