"""Inference similarity: PrototypeScorer.class_cosines' two paths, slabs vs pixel blocks.

For each shape (C classes, K prototypes per class, D embedding channels, pixels of a batch
of two images at the decode head's 1/4 resolution) and each thread count, times
``class_cosines`` with the path forced (``PrototypeScorer(inference=...)``): 'slabs' (K GEMMs
against C prototypes each, running max) and 'blocks' (pixel blocks against all C*K
prototypes, max over K per block). The two paths alternate in each repeat (after a warm-up
of each), the median is reported, with the path the rule of
:func:`mmseg_proto.models.utils.prototype_scorer.inference_path` picks for the shape.
Unit-norm random inputs (the time does not depend on the values). Prints a Markdown table;
writes no file.

    python benchmarks/bench_inference_similarity.py [--repeats 9] [--threads 1 2]
        [--shapes camvid ade20k ade20k-768 ade20k-full] [--device cpu]
"""
import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from mmseg_proto.models.utils.prototype_scorer import (PrototypeScorer, inference_path,
                                                       pixel_block)

# name -> (C, K, D, pixels): two images at 1/4 of the crop (CamVid 360x480, ADE20K 512x512).
SHAPES = {
    'camvid': (11, 10, 256, 2 * 90 * 120),
    'ade20k': (150, 10, 256, 2 * 128 * 128),
    'ade20k-768': (150, 10, 768, 2 * 128 * 128),
    'ade20k-full': (847, 10, 256, 2 * 128 * 128),
}


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def time_paths(c, k, d, n, device, repeats):
    """Median seconds of each path, alternating, and their largest difference."""
    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
    protos = F.normalize(torch.randn(c, k, d, generator=g), dim=-1).to(device)
    scorers = {p: PrototypeScorer(inference=p) for p in ('slabs', 'blocks')}

    def run(path):
        out = scorers[path].class_cosines(emb, protos)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return out

    outs = {p: run(p) for p in scorers}  # warm-up
    diff = (outs['slabs'] - outs['blocks']).abs().max().item()
    times = {p: [] for p in scorers}
    for r in range(repeats):
        order = list(scorers) if r % 2 == 0 else list(scorers)[::-1]
        for p in order:
            start = time.perf_counter()
            run(p)
            times[p].append(time.perf_counter() - start)
    return {p: statistics.median(t) for p, t in times.items()}, diff


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--repeats', type=int, default=9)
    p.add_argument('--threads', type=int, nargs='+', default=[1, 2])
    p.add_argument('--shapes', nargs='+', choices=list(SHAPES), default=list(SHAPES))
    p.add_argument('--device', default='cpu')
    args = p.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name()
    print(f'device: {where}, torch {torch.__version__}, median of {args.repeats} '
          'alternating repeats\n')
    print('| shape | C x K x D | pixels | threads | block (pixels, MiB) | slabs (ms) | '
          'blocks (ms) | slabs / blocks | rule picks | max abs diff |')
    print('|' + '---|' * 10)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name in args.shapes:
            c, k, d, n = SHAPES[name]
            block = min(n, pixel_block(c * k, 4))
            t, diff = time_paths(c, k, d, n, device, args.repeats)
            print(f'| {name} | {c} x {k} x {d} | {n} | {threads} | {block}, '
                  f'{block * c * k * 4 / 2**20:.1f} | {t["slabs"] * 1e3:.1f} | '
                  f'{t["blocks"] * 1e3:.1f} | {t["slabs"] / t["blocks"]:.2f} | '
                  f'{inference_path(c, k, d, device)} | {diff:.1e} |', flush=True)


if __name__ == '__main__':
    main()
