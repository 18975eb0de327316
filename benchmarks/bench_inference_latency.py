"""Inference latency, ProtoSeg vs the parametric baseline, in PyTorch and in ONNX Runtime.

SegFormer MiT-B0 and MiT-B2 (MMSeg's ADE20K configs: 150 classes, SegformerHead with 256
channels), one 512x512 image, random weights (latency does not depend on them): the
parametric model, ProtoSeg with K = 10 and with K = 1. Each model is wrapped as
``tools/deployment/pytorch2onnx.py`` exports it (preprocessing, backbone, head, resize to the
input) and timed in PyTorch (eager, no_grad) and, exported with the TorchScript exporter, in
ONNX Runtime (CPU execution provider); median of --repeats runs after a warm-up. Prints a
Markdown table with the ProtoSeg / parametric time ratios beside the FLOP ratio
(MMEngine's FlopAnalyzer, which counts the N x D x C*K similarity matmuls).

    python benchmarks/bench_inference_latency.py [--repeats 10] [--backbones b0 b2]
"""
import argparse
import os.path as osp
import statistics
import sys
import tempfile
import time

import mmseg
import numpy as np
import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS

from mmseg_proto.utils.onnx_export import SegmentorForExport, export

CONFIG = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs', 'segformer',
                  'segformer_mit-{}_8xb2-160k_ade20k-512x512.py')


def build(backbone: str, k: int):
    """Parametric model (k = 0) or ProtoSeg with k prototypes per class."""
    cfg = Config.fromfile(CONFIG.format(backbone))
    cfg.model.backbone.init_cfg = None
    cfg.model.pretrained = None
    if k:
        decoder = dict(cfg.model.decode_head)
        for key in ('loss_decode', 'num_classes'):
            decoder.pop(key, None)
        cfg.model.decode_head = dict(type='ProtoHead', num_classes=150, decoder=decoder,
                                     num_prototypes=k)
    return MODELS.build(cfg.model).eval()


def median_time(fn, repeats: int, device=torch.device('cpu')) -> float:
    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gflops(segmentor, image: torch.Tensor) -> float:
    sys.path.insert(0, osp.dirname(__file__))
    from bench_protoseg_perf import flops
    return flops(segmentor, image) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--backbones', nargs='+', default=['b0', 'b2'])
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--repeats', type=int, default=10)
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    args = p.parse_args()
    import onnxruntime as ort
    init_default_scope('mmseg')
    device = torch.device(args.device)
    provider = 'CUDAExecutionProvider' if device.type == 'cuda' else 'CPUExecutionProvider'
    use_ort = provider in ort.get_available_providers()
    image = torch.rand(1, 3, args.size, args.size) * 255
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda' else
             f'CPU, {torch.get_num_threads()} threads')
    print(f'{where}, torch {torch.__version__}, onnxruntime {ort.__version__} '
          f'({provider if use_ort else provider + " not available"}), '
          f'{args.size}x{args.size}, 150 classes, median of {args.repeats}')
    rows = []
    for backbone in args.backbones:
        times = {}
        for name, k in (('parametric', 0), ('ProtoSeg K=10', 10), ('ProtoSeg K=1', 1)):
            torch.manual_seed(0)
            segmentor = build(backbone, k)
            module = SegmentorForExport(segmentor).eval()
            with torch.no_grad():
                module.to(device)
                on_device = image.to(device)
                t_torch = median_time(lambda: module(on_device), args.repeats, device)
                module.cpu()
            t_ort = float('nan')
            if use_ort:
                with tempfile.TemporaryDirectory() as tmp:
                    path = osp.join(tmp, 'model.onnx')
                    export(module, path, (args.size, args.size), False, 'torchscript')
                    session = ort.InferenceSession(path, providers=[provider])
                    feed = {'image': image.numpy().astype(np.float32)}
                    t_ort = median_time(lambda: session.run(None, feed), args.repeats)
            times[name] = (t_torch, t_ort, gflops(segmentor, image / 255))
        base = times['parametric']
        for name, (t_torch, t_ort, fl) in times.items():
            digits = 0 if device.type == 'cpu' else 1  # GPU times are a few ms
            ort_ms, ort_ratio = ((f'{1e3 * t_ort:.0f}', f'{t_ort / base[1]:.2f}') if use_ort
                                 else ('n/a', 'n/a'))
            rows.append(f'| MiT-{backbone.upper()} | {name} | {1e3 * t_torch:.{digits}f} | '
                        f'{ort_ms} | {t_torch / base[0]:.2f} | {ort_ratio} | {fl:.1f} | '
                        f'{fl / base[2]:.3f} |')
    print('\n| backbone | model | PyTorch (ms) | ONNX Runtime (ms) | PyTorch ratio | '
          'ORT ratio | GFLOPs | FLOP ratio |')
    print('|' + '---|' * 8)
    print('\n'.join(rows))


if __name__ == '__main__':
    main()
