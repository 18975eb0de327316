"""ProtoHead on a CUDA device against a float64 CPU reference.

For each loss path (fused, eager, streamed) and PPC temperature, one ProtoHead at ADE20K's
size (150 classes, K = 10) computes CE + PPC + PPD, the input gradient and the prototype
statistics on the GPU in float32 (TF32 off) and under autocast (float16, bfloat16), and the
same head computes them on the CPU in float64. Prints one row per case: the relative error of
each loss, of the gradient, of the statistics' sums, and the share of prototypes whose pixel
count differs (fp32 vs fp64 can flip a Sinkhorn assignment at a near tie). Exits non-zero if a
float32 case is off by more than 1e-4 (losses, gradient) or any result is non-finite.

    python tools/dev/check_cuda.py [--device cuda]
"""
import argparse
import sys

import torch
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_proto  # noqa: F401

PATHS = {'fused': dict(), 'eager': dict(fused_losses=False),
         'streamed': dict(similarity_chunk=4096)}


def build_head(path: str, temperature: float, channels: int, num_classes: int, k: int):
    losses = [dict(type='CrossEntropyLoss', loss_weight=1.0),
              dict(type='PixelPrototypeContrastLoss', loss_weight=0.01,
                   temperature=temperature),
              dict(type='PixelPrototypeDistanceLoss', loss_weight=0.001)]
    cfg = dict(type='ProtoHead', num_classes=num_classes, num_prototypes=k,
               loss_decode=losses,
               decoder=dict(type='FCNHead', in_channels=channels, channels=channels,
                            num_convs=1, concat_input=False, dropout_ratio=0.0,
                            in_index=0, norm_cfg=dict(type='BN', requires_grad=True)),
               **PATHS[path])
    return MODELS.build(cfg)


def samples(labels):
    out = []
    for lab in labels:
        s = SegDataSample(gt_sem_seg=PixelData(data=lab[None]))
        s.set_metainfo(dict(img_shape=tuple(lab.shape), ori_shape=tuple(lab.shape),
                            pad_shape=tuple(lab.shape)))
        out.append(s)
    return out


def run(head, x, labels, device, dtype, autocast=None):
    head = head.to(device=device, dtype=dtype).train()
    x = x.to(device=device, dtype=dtype).requires_grad_()
    labels = labels.to(device)
    with torch.autocast('cuda', dtype=autocast, enabled=autocast is not None):
        losses = head.loss([x], samples(labels), None)
    losses = {n: v.double().cpu() for n, v in losses.items() if n.startswith('loss')}
    grad = torch.autograd.grad(sum(losses.values()), x)[0].double().cpu()
    stats = head.bank.batch
    head.bank.discard()
    return losses, grad, stats.sums.double().cpu(), stats.counts.cpu()


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--classes', type=int, default=150)
    p.add_argument('--k', type=int, default=10)
    p.add_argument('--channels', type=int, default=64)
    p.add_argument('--size', type=int, default=64)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    print(f'device: {name}, torch {torch.__version__}, C={args.classes}, K={args.k}, '
          f'D={args.channels}, 2x{args.size}x{args.size} pixels')
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, args.channels, args.size, args.size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, args.classes, (2, args.size, args.size), generator=g)
    labels[0, :8] = 255
    failures = []
    print('| path | T | precision | CE | PPC | PPD | grad | stat sums | counts differ |')
    print('|---|---|---|---|---|---|---|---|---|')
    for path in PATHS:
        for temperature in (1.0, 0.1):
            torch.manual_seed(0)
            head = build_head(path, temperature, args.channels, args.classes, args.k)
            state = {n: t.clone() for n, t in head.state_dict().items()}
            ref = run(head, x, labels, 'cpu', torch.float64)
            for label, dtype, autocast in (('fp32', torch.float32, None),
                                           ('amp fp16', torch.float32, torch.float16),
                                           ('amp bf16', torch.float32, torch.bfloat16)):
                if autocast is not None and device.type != 'cuda':
                    continue
                head.load_state_dict(state)
                got = run(head, x, labels, device, dtype, autocast)
                errs = [rel(got[0][n], ref[0][n]) for n in ('loss_ce', 'loss_ppc', 'loss_ppd')]
                errs += [rel(got[1], ref[1]), rel(got[2], ref[2])]
                counts = float((got[3] != ref[3]).float().mean())
                finite = all(torch.isfinite(t).all() for t in
                             (*got[0].values(), got[1], got[2]))
                print(f'| {path} | {temperature} | {label} | ' +
                      ' | '.join(f'{e:.1e}' for e in errs) + f' | {100 * counts:.2f}% |')
                if not finite or (label == 'fp32' and max(errs[:4]) > 1e-4):
                    failures.append(f'{path} T={temperature} {label}: finite={finite}, '
                                    f'errors {errs}')
                head.load_state_dict(state)
    for f in failures:
        print('FAIL', f)
    print('all float32 cases within 1e-4 of float64' if not failures else 'FAILED')
    sys.exit(1 if failures else 0)


if __name__ == '__main__':
    main()
