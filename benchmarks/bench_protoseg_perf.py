"""ProtoSeg vs the parametric baseline: step time, inference time, FLOPs, profile.

SegFormer MiT-B2 on ADE20K settings (150 classes, K=10, 512x512 crops, batch 2 per device as
in MMSeg's 8x2 recipe). Measured in one process, baseline and ProtoSeg alternating, median
of repeated runs. Prints Markdown tables:

1. training step (forward, backward, AdamW step, prototype update) and whole inference,
   ProtoSeg / parametric, beside the ratio of their FLOP counts (MMEngine's FlopAnalyzer,
   which counts the similarity matmul);
2. a torch.profiler split of the time ProtoSeg adds over the baseline into the similarity
   matrix products (pixels x C*K x D, forward and backward) and everything else.

Runs on a GPU unchanged (device chosen automatically; --device to force).

    python benchmarks/bench_protoseg_perf.py [--channels 256 768] [--repeats 5]
"""
import argparse
import os.path as osp
import statistics
import time

import mmseg
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmengine.structures import PixelData
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

import mmseg_proto  # noqa: F401

BASE = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs', 'segformer',
                'segformer_mit-b2_8xb2-160k_ade20k-512x512.py')
MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul',
              'aten::linear')


def build(channels: int, proto: bool, k: int, device):
    cfg = Config.fromfile(BASE)
    model_cfg = cfg.model
    model_cfg.backbone.init_cfg = None
    model_cfg.pretrained = None
    model_cfg.data_preprocessor = None
    head = model_cfg.decode_head
    head.channels = channels
    if proto:
        decoder = dict(head)
        for key in ('loss_decode', 'num_classes'):
            decoder.pop(key, None)
        model_cfg.decode_head = dict(
            type='ProtoHead', num_classes=head.num_classes, decoder=decoder,
            num_prototypes=k)
    model = revert_sync_batchnorm(MODELS.build(model_cfg)).to(device)
    return model


def batch(b, size, num_classes, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(b, 3, size, size, generator=g).to(device)
    samples = []
    for _ in range(b):
        lab = torch.randint(0, num_classes, (1, size, size), generator=g)
        lab[:, :size // 8] = 255
        s = SegDataSample(gt_sem_seg=PixelData(data=lab.to(device)))
        s.set_metainfo(dict(img_shape=(size, size), ori_shape=(size, size),
                            pad_shape=(size, size)))
        samples.append(s)
    return imgs, samples


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def proto_heads(model):
    return [m for m in model.modules()
            if isinstance(m, mmseg_proto.ProtoHead)]


def train_step(model, optim, imgs, samples):
    losses = model.loss(imgs, samples)
    loss, _ = model.parse_losses(losses)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    for head in proto_heads(model):  # what PrototypeUpdateHook does
        head.update_prototypes(*head.pop_prototype_statistics())


@torch.no_grad()
def infer(model, imgs, samples):
    return model.predict(imgs, samples)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def flops(model, imgs):
    from mmengine.analysis import FlopAnalyzer

    class Tensor(torch.nn.Module):

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m._forward(x)

    model.eval()
    analyzer = FlopAnalyzer(Tensor(model), (imgs, ))
    analyzer.unsupported_ops_warnings(False)
    analyzer.uncalled_modules_warnings(False)
    return analyzer.total()


def similarity_time(model, fn, sizes, device, repeats=2):
    """Self time of the matmuls with an operand dimension in ``sizes``.

    Training multiplies by all C*K prototypes at once; inference by one slab
    of C prototypes at a time (K matmuls): sizes = {C*K, C}.
    """
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                     if device.type == 'cuda' else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(repeats):
            fn()
        sync(device)
    sim = total = 0.0
    for evt in prof.key_averages(group_by_input_shape=True):
        t = (evt.self_device_time_total if device.type == 'cuda' else
             evt.self_cpu_time_total) / 1e6 / repeats
        total += t
        dims = [d for shape in evt.input_shapes for d in shape]
        if evt.key in MATMUL_OPS and sizes & set(dims):
            sim += t
    return sim


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--channels', type=int, nargs='+', default=[256, 768],
                   help='decoder width: 256 = MMSeg, 768 = original SegFormer')
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--k', type=int, default=10)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available()
                   else 'cpu')
    args = p.parse_args()
    init_default_scope('mmseg')
    device = torch.device(args.device)
    print(f'device: {device} ({torch.get_num_threads()} threads), SegFormer '
          f'MiT-B2, 150 classes, K={args.k}, batch {args.batch}, '
          f'{args.size}x{args.size}, median of {args.repeats}')
    rows, prof_rows = [], []
    for ch in args.channels:
        torch.manual_seed(0)
        models = dict(base=build(ch, False, args.k, device),
                      proto=build(ch, True, args.k, device))
        optims = {n: torch.optim.AdamW(m.parameters(), lr=6e-5)
                  for n, m in models.items()}
        imgs, samples = batch(args.batch, args.size, 150, device)
        times = {(n, w): [] for n in models for w in ('train', 'infer')}
        for n, m in models.items():  # warm-up
            m.train()
            train_step(m, optims[n], imgs, samples)
        for _ in range(args.repeats):
            for n, m in models.items():
                m.train()
                times[n, 'train'].append(timed(
                    lambda: train_step(m, optims[n], imgs, samples), device))
                m.eval()
                times[n, 'infer'].append(timed(
                    lambda: infer(m, imgs, samples), device))
        med = {key: statistics.median(v) for key, v in times.items()}
        fl = {n: flops(m, imgs) for n, m in models.items()}
        params = {n: sum(q.numel() for q in m.parameters())
                  for n, m in models.items()}
        rows.append(
            f"| {ch} | {params['base'] / 1e6:.2f} / {params['proto'] / 1e6:.2f}"
            f" | {med['base', 'train']:.3f} | {med['proto', 'train']:.3f} | "
            f"{med['proto', 'train'] / med['base', 'train']:.2f} | "
            f"{med['base', 'infer']:.3f} | {med['proto', 'infer']:.3f} | "
            f"{med['proto', 'infer'] / med['base', 'infer']:.2f} | "
            f"{fl['base'] / 1e9:.1f} / {fl['proto'] / 1e9:.1f} | "
            f"{fl['proto'] / fl['base']:.3f} |")
        sizes = {150 * args.k, 150}
        proto = models['proto']
        proto.train()
        sim_train = similarity_time(
            proto, lambda: train_step(proto, optims['proto'], imgs, samples),
            sizes, device)
        proto.eval()
        sim_infer = similarity_time(proto,
                                    lambda: infer(proto, imgs, samples),
                                    sizes, device)
        for what, sim in (('train', sim_train), ('infer', sim_infer)):
            added = med['proto', what] - med['base', what]
            other = added - sim
            prof_rows.append(
                f'| {ch} | {what} | {added:.3f} | {sim:.3f} | {other:.3f} | '
                f'{100 * other / added if added > 0 else float("nan"):.0f}% |')
    print('\n| decoder width | params base / proto (M) | train base (s) | '
          'train proto (s) | train ratio | infer base (s) | infer proto (s) | '
          'infer ratio | GFLOPs base / proto | FLOP ratio |')
    print('|' + '---|' * 10)
    print('\n'.join(rows))
    print('\n| decoder width | step | added time (s) | similarity matmuls (s) '
          '| everything else (s) | else / added |')
    print('|' + '---|' * 6)
    print('\n'.join(prof_rows))


if __name__ == '__main__':
    main()
