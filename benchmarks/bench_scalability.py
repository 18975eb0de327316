"""Scalability with the number of classes, like the paper's Table 4.

For C in {150, 300, 500, 700, 847} and K in {1, 10}: parameter counts (head total and the
classifier / prototype part) of the parametric SegformerHead and of ProtoHead on the same
decoder (width 768 as in the paper), the head's training-step time (forward + backward +
prototype update) and inference time on 2 x 128 x 128 decoder pixels (a 512x512 batch of 2),
and peak memory. Every case runs in its own process so peak memory (max RSS on CPU,
max_memory_allocated on GPU) belongs to that case alone. Runs on a GPU unchanged.

    python benchmarks/bench_scalability.py [--classes 150 847] [--k 1 10]
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PAPER_M = {  # Table 4 "# Param (M)" of the classifier, D=768
    ('parametric', 150, 1): 0.12, ('parametric', 847, 1): 0.65,
    ('parametric', 847, 10): 6.5, ('protoseg', 150, 10): 0.0,
    ('protoseg', 847, 10): 0.0}


def run_case(kind, c, k, channels, size, batch, repeats, device_name,
             chunk=None):
    import torch
    from mmengine.registry import init_default_scope
    from mmengine.structures import PixelData
    from mmseg.registry import MODELS
    from mmseg.structures import SegDataSample

    import mmseg_proto  # noqa: F401
    init_default_scope('mmseg')
    device = torch.device(device_name)
    decoder = dict(type='SegformerHead', in_channels=[64, 128, 320, 512],
                   in_index=[0, 1, 2, 3], channels=channels,
                   dropout_ratio=0.1, norm_cfg=dict(type='BN'),
                   align_corners=False)
    if kind == 'parametric':
        head = MODELS.build(dict(decoder, num_classes=c * k))
        cls_params = sum(p.numel() for p in head.conv_seg.parameters())
    else:
        head = MODELS.build(dict(type='ProtoHead', num_classes=c,
                                 num_prototypes=k, decoder=decoder,
                                 similarity_chunk=chunk))
        cls_params = 0  # prototypes are a buffer, not parameters
    head = head.to(device)
    total = sum(p.numel() for p in head.parameters())
    h = size // 4
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(batch, ch, h // s, h // s, generator=g).to(device)
             for ch, s in zip([64, 128, 320, 512], [1, 2, 4, 8])]
    samples = []
    for _ in range(batch):
        lab = torch.randint(0, c, (1, size, size), generator=g).to(device)
        s = SegDataSample(gt_sem_seg=PixelData(data=lab))
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size)))
        samples.append(s)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    def train():
        if kind == 'parametric' and k > 1:
            return  # only its parameters are reported (as in the paper)
        losses = head.loss(feats, samples, None)
        sum(v for n, v in losses.items() if n.startswith('loss')).backward()
        if kind == 'protoseg':
            head.bank.accumulate()  # what PrototypeUpdateHook does
            head.bank.apply()

    @torch.no_grad()
    def infer():
        head.predict(feats, [s.metainfo for s in samples], None)

    out = dict(kind=kind, classes=c, k=k, head_params=total,
               cls_params=cls_params)
    for name, fn, mode in (('train_s', train, True), ('infer_s', infer,
                                                      False)):
        head.train(mode)
        fn()
        ts = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts)
    out['peak_mb'] = (torch.cuda.max_memory_allocated() / 2**20
                      if device.type == 'cuda' else
                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--classes', type=int, nargs='+',
                   default=[150, 300, 500, 700, 847])
    p.add_argument('--k', type=int, nargs='+', default=[1, 10])
    p.add_argument('--channels', type=int, default=768)
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--device', default=None)
    p.add_argument('--chunk', type=int, default=None,
                   help='ProtoHead similarity_chunk (pixels per block in '
                   'training); default: whole batch')
    p.add_argument('--case', nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args.case:
        kind, c, k = args.case[0], int(args.case[1]), int(args.case[2])
        print(json.dumps(run_case(kind, c, k, args.channels, args.size,
                                  args.batch, args.repeats, device,
                                  args.chunk)))
        return
    print(f'device: {device}, decoder width {args.channels}, batch '
          f'{args.batch} at {args.size}x{args.size} (head sees '
          f'{args.batch} x {args.size // 4} x {args.size // 4} pixels), '
          f'median of {args.repeats}, similarity_chunk={args.chunk}')
    print('| model | C | K | head params (M) | classifier / prototype params '
          '(M) | paper (M) | train step (s) | inference (s) | peak memory '
          '(MB) |')
    print('|' + '---|' * 9)
    for c in args.classes:
        for k in args.k:
            for kind in ('parametric', 'protoseg'):
                res = subprocess.run(
                    [sys.executable, __file__, '--case', kind, str(c), str(k),
                     '--channels', str(args.channels), '--size',
                     str(args.size), '--batch', str(args.batch), '--repeats',
                     str(args.repeats), '--device', device] +
                    (['--chunk', str(args.chunk)] if args.chunk else []),
                    check=True, capture_output=True, text=True)
                r = json.loads(res.stdout.strip().splitlines()[-1])
                paper = PAPER_M.get((kind, c, k))
                timed = kind == 'protoseg' or k == 1
                print(f"| {kind} | {c} | {k} | {r['head_params'] / 1e6:.2f} | "
                      f"{r['cls_params'] / 1e6:.2f} | "
                      f"{'' if paper is None else paper} | "
                      f"{r['train_s']:.3f} | " if timed else
                      f"| {kind} | {c} | {k} | {r['head_params'] / 1e6:.2f} | "
                      f"{r['cls_params'] / 1e6:.2f} | "
                      f"{'' if paper is None else paper} | - | ", end='')
                print(f"{r['infer_s']:.3f} | {r['peak_mb']:.0f} |" if timed
                      else '- | - |', flush=True)


if __name__ == '__main__':
    main()
