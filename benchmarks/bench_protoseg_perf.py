"""ProtoSeg vs the parametric baseline: step time, inference time, FLOPs, profile.

SegFormer MiT-B2 on ADE20K settings (150 classes, K=10, 512x512 crops, batch 2 per device as
in MMSeg's 8x2 recipe). Measured in one process, baseline and ProtoSeg alternating, median
of repeated runs. Prints Markdown tables:

1. training step (forward, backward, AdamW step, prototype update) and whole inference,
   ProtoSeg / parametric, beside the ratio of their FLOP counts (MMEngine's FlopAnalyzer,
   which counts the similarity matmul);
2. a torch.profiler split of the time ProtoSeg adds over the baseline into the similarity
   matrix products (pixels x C*K x D, forward and backward) and everything else, for the
   whole model;
3. the same split for the decode head alone on fixed backbone features (head forward,
   backward and prototype update; head prediction): the models differ only in their heads,
   and without the backbone's run-to-run noise the difference is measured more precisely;
4. with ``--compile``: the decode heads' training step again, each head's ``loss`` under
   ``torch.compile`` (default options, what MMEngine's ``compile=True`` applies to the
   ``train_step`` around it), beside eager, with the number of graphs and graph breaks
   ``torch._dynamo.explain`` finds in each head's loss.

``--compare-fused`` measures only whether the fused PPC/PPD path earns its place: the whole
training step of the parametric baseline and of ProtoSeg with ``fused_losses=True`` and
``False`` (same weights, same batch), alternating in one run, and the share of the unfused
step the fused path saves.

``--compare-inference`` measures only the two paths of ProtoSeg's inference similarity
(``PrototypeScorer.class_cosines``: K slabs of C prototypes, or pixel blocks against all
C*K prototypes): whole inference and the decode head alone on fixed backbone features, of
the parametric model and of one ProtoSeg model with each path forced, alternating in one run.

CPU memory allocator: every fresh (pixels x C*K) or label-sized tensor costs its page
faults with glibc's default malloc, which returns large blocks to the OS on free.
``--allocator cached`` (default) re-runs the script with glibc told to keep freed memory
(MALLOC_MMAP_MAX_=0, MALLOC_TRIM_THRESHOLD_ large), the effect of the jemalloc/tcmalloc
set-up PyTorch's CPU performance guide recommends; both models run under it.
``--allocator system`` measures glibc's defaults. Irrelevant on a GPU (device memory is
cached by PyTorch).

Runs on a GPU unchanged (device chosen automatically; --device to force).

    python benchmarks/bench_protoseg_perf.py [--channels 256 768] [--repeats 9] [--compile]
    python benchmarks/bench_protoseg_perf.py --channels 256 --repeats 5 --compare-fused
    python benchmarks/bench_protoseg_perf.py --channels 256 --infer-repeats 11 --compare-inference
"""
import argparse
import os
import os.path as osp
import statistics
import sys
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
from mmseg_proto.models.utils import PrototypeBank

BASE = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs', 'segformer',
                'segformer_mit-b2_8xb2-160k_ade20k-512x512.py')
MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul',
              'aten::linear')
# glibc: no mmap for large blocks (they would be unmapped on free and
# page-faulted again on the next allocation) and no trimming of the heap.
CACHED_MALLOC = dict(MALLOC_MMAP_MAX_='0',
                     MALLOC_TRIM_THRESHOLD_=str(1 << 40))


def build(channels: int, proto: bool, k: int, device, fused: bool = True):
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
            num_prototypes=k, fused_losses=fused)
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


def update_prototypes(model):
    """What PrototypeUpdateHook does after an optimizer step (one process)."""
    for bank in model.modules():
        if isinstance(bank, PrototypeBank):
            bank.accumulate()
            bank.apply()


def train_step(model, optim, imgs, samples):
    losses = model.loss(imgs, samples)
    loss, _ = model.parse_losses(losses)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    update_prototypes(model)


@torch.no_grad()
def infer(model, imgs, samples):
    return model.predict(imgs, samples)


def head_train_step(model, feats, samples):
    """Decode head only: loss, backward (into the features too), update."""
    head = model.decode_head
    losses = head.loss([f.detach().requires_grad_() for f in feats], samples,
                       model.train_cfg)
    loss, _ = model.parse_losses(losses)
    loss.backward()
    update_prototypes(model)
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def head_infer(model, feats, samples):
    """Decode head only: seg logits resized to the image, as predicted."""
    metas = [s.metainfo for s in samples]
    return model.decode_head.predict(feats, metas, model.test_cfg)


def graph_breaks(model, feats, samples):
    """(graphs, graph breaks) that torch.compile makes of the head's loss."""
    head = model.decode_head
    explained = torch._dynamo.explain(head.loss)(feats, samples,
                                                 model.train_cfg)
    for bank in model.modules():
        if isinstance(bank, PrototypeBank):
            bank.discard()
    return explained.graph_count, explained.graph_break_count


def compiled_head_rows(models, feats, samples, ch, repeats, device):
    """Head training step, eager and with each head's loss compiled."""
    for m in models.values():
        m.train()
    steps = {n: (lambda m=m, n=n: head_train_step(m, feats[n], samples))
             for n, m in models.items()}
    eager = alternate(steps, repeats, device)
    breaks = {n: graph_breaks(m, feats[n], samples) for n, m in models.items()}
    for m in models.values():
        m.decode_head.loss = torch.compile(m.decode_head.loss)
    start = time.perf_counter()
    for fn in steps.values():  # compiles
        fn()
    compile_s = time.perf_counter() - start
    compiled = alternate(steps, repeats, device)
    for m in models.values():
        del m.decode_head.loss  # back to the class's method
    return [
        f"| {ch} | {mode} | {t['base']:.3f} | {t['proto']:.3f} | "
        f"{t['proto'] / t['base']:.2f} | {breaks['base'][0]} / "
        f"{breaks['base'][1]} | {breaks['proto'][0]} / {breaks['proto'][1]}"
        f" | {'-' if mode == 'eager' else f'{compile_s:.0f}'} |"
        for mode, t in (('eager', eager), ('compiled', compiled))]


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


def split_row(ch, what, added, sim):
    other = added - sim
    share = 100 * other / added if added > 0 else float('nan')
    return (f'| {ch} | {what} | {added:.3f} | {sim:.3f} | {other:.3f} | '
            f'{share:.0f}% |')


def alternate(fns, repeats, device):
    """Median time of each function, run in turn ``repeats`` times."""
    times = {name: [] for name in fns}
    for name, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(v) for name, v in times.items()}


def fused_row(ch, args, device):
    """Whole training step: parametric, ProtoSeg fused and unfused, one run, alternating."""
    models = {}
    for name, proto, fused in (('base', False, True), ('fused', True, True),
                               ('unfused', True, False)):
        torch.manual_seed(0)  # the same initial weights for both ProtoSeg models
        models[name] = build(ch, proto, args.k, device, fused=fused).train()
    assert models['fused'].decode_head.scorer.path == 'fused'
    assert models['unfused'].decode_head.scorer.path == 'eager'
    optims = {n: torch.optim.AdamW(m.parameters(), lr=6e-5) for n, m in models.items()}
    imgs, samples = batch(args.batch, args.size, 150, device)
    t = alternate({n: (lambda m=m, n=n: train_step(m, optims[n], imgs, samples))
                   for n, m in models.items()}, args.repeats, device)
    saved = t['unfused'] - t['fused']
    return (f"| {ch} | {t['base']:.3f} | {t['fused']:.3f} | {t['unfused']:.3f} | "
            f"{t['fused'] / t['base']:.2f} / {t['unfused'] / t['base']:.2f} | "
            f"{saved:.3f} | {100 * saved / t['unfused']:.0f}% |")


def inference_row(ch, args, device):
    """Whole inference and head-alone inference: parametric, ProtoSeg with the slab path and
    with the block path (one ProtoSeg model, the path forced), one run, alternating."""
    torch.manual_seed(0)
    base = build(ch, False, args.k, device).eval()
    proto = build(ch, True, args.k, device).eval()
    models = dict(base=base, slabs=proto, blocks=proto)
    imgs, samples = batch(args.batch, args.size, 150, device)
    with torch.no_grad():
        feats = {n: [f.detach() for f in m.extract_feat(imgs)] for n, m in models.items()}

    def run(name, fn):
        if name != 'base':
            proto.decode_head.scorer.inference = name
        return fn()

    whole = alternate({n: (lambda m=m, n=n: run(n, lambda: infer(m, imgs, samples)))
                       for n, m in models.items()}, args.infer_repeats, device)
    head = alternate({n: (lambda m=m, n=n: run(n, lambda: head_infer(m, feats[n], samples)))
                      for n, m in models.items()}, args.infer_repeats, device)
    proto.decode_head.scorer.inference = None
    cells = []
    for t in (whole, head):
        cells.append(f"{t['base']:.3f} | {t['slabs']:.3f} | {t['blocks']:.3f} | "
                     f"{t['slabs'] / t['base']:.2f} / {t['blocks'] / t['base']:.2f} | "
                     f"{100 * (t['slabs'] - t['blocks']) / t['slabs']:.1f}%")
    return f'| {ch} | ' + ' | '.join(cells) + ' |'


def print_table(columns, rows, title: str = '') -> None:
    """A markdown table (after ``title`` and a blank line, if given), its separator row as
    wide as ``columns``."""
    print(f'\n{title}\n' * bool(title) + '\n| ' + ' | '.join(columns) + ' |')
    print('|' + '---|' * len(columns))
    print('\n'.join(rows))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--channels', type=int, nargs='+', default=[256, 768],
                   help='decoder width: 256 = MMSeg, 768 = original SegFormer')
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--batch', type=int, default=2)
    p.add_argument('--k', type=int, default=10)
    p.add_argument('--repeats', type=int, default=9,
                   help='training steps timed per model (median)')
    p.add_argument('--infer-repeats', type=int, default=21,
                   help='inference runs timed per model (median)')
    p.add_argument('--allocator', choices=('cached', 'system'),
                   default='cached', help='CPU malloc behaviour (see above)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available()
                   else 'cpu')
    p.add_argument('--compile', action='store_true',
                   help='also time the heads with torch.compile (table 4)')
    p.add_argument('--compare-fused', action='store_true',
                   help='only the whole training step: parametric, ProtoSeg with '
                   'fused_losses=True and False, in one run (see above)')
    p.add_argument('--compare-inference', action='store_true',
                   help='only inference: parametric, ProtoSeg with the slab and with the '
                   'block similarity path, in one run (see above)')
    args = p.parse_args()
    if args.allocator == 'cached' and sys.platform.startswith('linux') and \
            any(os.environ.get(k) != v for k, v in CACHED_MALLOC.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  {**os.environ, **CACHED_MALLOC})
    init_default_scope('mmseg')
    device = torch.device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda' else
             f'{device} ({torch.get_num_threads()} threads)')
    print(f'device: {where}, torch {torch.__version__}, SegFormer '
          f'MiT-B2, 150 classes, K={args.k}, batch {args.batch}, '
          f'{args.size}x{args.size}, allocator {args.allocator}, median of '
          f'{args.repeats} training steps / {args.infer_repeats} inferences')
    if args.compare_fused:
        rows = [fused_row(ch, args, device) for ch in args.channels]
        print_table(['decoder width', 'train base (s)', 'train ProtoSeg fused (s)',
                     'train ProtoSeg unfused (s)', 'ratio to base, fused / unfused',
                     'fused saves (s)', 'share of the unfused step'], rows)
        return
    if args.compare_inference:
        rows = [inference_row(ch, args, device) for ch in args.channels]
        print_table(['decoder width', 'infer base (s)', 'infer slabs (s)', 'infer blocks (s)',
                     'ratio to base, slabs / blocks', 'blocks save', 'head base (s)',
                     'head slabs (s)', 'head blocks (s)', 'head ratio, slabs / blocks',
                     'blocks save (head)'], rows)
        return
    rows, prof_rows, head_rows, compile_rows = [], [], [], []
    sizes = {150 * args.k, 150}
    for ch in args.channels:
        torch.manual_seed(0)
        models = dict(base=build(ch, False, args.k, device),
                      proto=build(ch, True, args.k, device))
        optims = {n: torch.optim.AdamW(m.parameters(), lr=6e-5)
                  for n, m in models.items()}
        imgs, samples = batch(args.batch, args.size, 150, device)
        for m in models.values():
            m.train()
        med = {(n, 'train'): t for n, t in alternate(
            {n: (lambda m=m, n=n: train_step(m, optims[n], imgs, samples))
             for n, m in models.items()}, args.repeats, device).items()}
        for m in models.values():
            m.eval()
        med.update({(n, 'infer'): t for n, t in alternate(
            {n: (lambda m=m: infer(m, imgs, samples))
             for n, m in models.items()}, args.infer_repeats,
            device).items()})
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
            prof_rows.append(split_row(
                ch, what, med['proto', what] - med['base', what], sim))

        # The decode heads alone, on each model's own backbone features.
        with torch.no_grad():
            feats = {n: [f.detach() for f in m.extract_feat(imgs)]
                     for n, m in models.items()}
        for m in models.values():
            m.train()
        head = {(n, 'train'): t for n, t in alternate(
            {n: (lambda m=m, n=n: head_train_step(m, feats[n], samples))
             for n, m in models.items()}, 2 * args.repeats, device).items()}
        for m in models.values():
            m.eval()
        head.update({(n, 'infer'): t for n, t in alternate(
            {n: (lambda m=m, n=n: head_infer(m, feats[n], samples))
             for n, m in models.items()}, args.infer_repeats,
            device).items()})
        proto.train()
        sims = {'train': similarity_time(
            proto, lambda: head_train_step(proto, feats['proto'], samples),
            sizes, device)}
        proto.eval()
        sims['infer'] = similarity_time(
            proto, lambda: head_infer(proto, feats['proto'], samples), sizes,
            device)
        for what in ('train', 'infer'):
            head_rows.append(
                f"| {ch} | {what} | {head['base', what]:.3f} | "
                f"{head['proto', what]:.3f} | " + split_row(
                    ch, what, head['proto', what] - head['base', what],
                    sims[what]).split('| ', 3)[3])
        if args.compile:
            compile_rows += compiled_head_rows(models, feats, samples, ch,
                                               2 * args.repeats, device)
    print_table(['decoder width', 'params base / proto (M)', 'train base (s)',
                 'train proto (s)', 'train ratio', 'infer base (s)', 'infer proto (s)',
                 'infer ratio', 'GFLOPs base / proto', 'FLOP ratio'], rows)
    print_table(['decoder width', 'step', 'added time (s)', 'similarity matmuls (s)',
                 'everything else (s)', 'else / added'], prof_rows, 'Whole model:')
    print_table(['decoder width', 'step', 'base head (s)', 'ProtoSeg head (s)',
                 'added time (s)', 'similarity matmuls (s)', 'everything else (s)',
                 'else / added'], head_rows, 'Decode head alone (fixed backbone features):')
    if compile_rows:
        print_table(['decoder width', 'mode', 'base head (s)', 'ProtoSeg head (s)', 'ratio',
                     'base graphs / breaks', 'ProtoSeg graphs / breaks',
                     'compile time, both (s)'], compile_rows,
                    'Decode head training step, eager and torch.compile:')


if __name__ == '__main__':
    main()
