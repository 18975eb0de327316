"""Record the first iterations of CamVid training, bit for bit, to compare two versions of the code.

Trains the shipped ProtoSeg CamVid config (bundled subset unless MMSEG_PROTO_CAMVID is set)
with ``randomness=dict(seed=0, deterministic=True)`` and saves, after every iteration (after the
prototype update), the total loss, CE, PPC, PPD and the prototypes. ``--compare A B`` prints
the largest difference of each between two recordings and exits 1 unless they are identical.

    python tools/dev/record_training_trace.py --iters 50 --out trace_new.pt
    python tools/dev/record_training_trace.py --compare trace_old.pt trace_new.pt

Run it from a checkout of each version (e.g. ``git worktree add /tmp/old <commit>``; the
package imported is the one of the checkout the script lives in).
"""
import argparse
import os.path as osp
import sys
import tempfile

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG = osp.join(REPO, 'configs/protoseg/camvid/'
                  'protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py')
KEYS = ('loss', 'decode.loss_ce', 'decode.loss_ppc', 'decode.loss_ppd')


def record(iters: int, out: str, out_folder) -> None:
    """Train ``iters`` iterations and save the trace to ``out`` (in ``out_folder``)."""
    sys.path.insert(0, REPO)
    import torch
    from mmengine.config import Config
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS
    from mmengine.runner import Runner

    import mmseg_proto  # noqa: F401
    torch.set_num_threads(1)
    trace = {key: [] for key in KEYS + ('prototypes',)}

    @HOOKS.register_module(force=True)
    class TraceHook(Hook):
        priority = 'LOWEST'  # after PrototypeUpdateHook's update

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            for key in KEYS:
                trace[key].append(float(outputs[key]))
            head = runner.model.decode_head
            trace['prototypes'].append(head.prototypes.detach().clone())

    cfg = Config.fromfile(CONFIG)
    cfg.randomness = dict(seed=0, deterministic=True)
    cfg.train_cfg.max_iters = iters
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10**9,
                                        save_last=False)
    cfg.default_hooks.logger.interval = 10**9
    cfg.custom_hooks = list(cfg.get('custom_hooks', [])) + [dict(type='TraceHook')]
    with tempfile.TemporaryDirectory() as work_dir:
        cfg.work_dir = work_dir
        Runner.from_cfg(cfg).train()
    trace['prototypes'] = torch.stack(trace['prototypes'])
    with out_folder.atomic(osp.basename(out)) as tmp:
        torch.save(trace, tmp)
    print(f'{iters} iterations recorded to {out}; last loss {trace["loss"][-1]:.6f}')


def compare(a: str, b: str) -> int:
    import torch
    ta, tb = torch.load(a), torch.load(b)
    same = True
    for key in KEYS:
        x, y = torch.tensor(ta[key], dtype=torch.float64), torch.tensor(tb[key],
                                                                         dtype=torch.float64)
        if x.shape != y.shape:
            print(f'{key}: {len(x)} against {len(y)} iterations')
            same = False
            continue
        diff = (x - y).abs().max().item()
        same &= diff == 0
        print(f'{key}: {len(x)} iterations, max |difference| {diff:.3g}')
    diff = (ta['prototypes'] - tb['prototypes']).abs().max().item()
    same &= diff == 0
    print(f"prototypes: {tuple(ta['prototypes'].shape)}, max |difference| {diff:.3g}")
    print('identical to the last bit' if same else 'DIFFERENT')
    return 0 if same else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--iters', type=int, default=50)
    p.add_argument('--out', default='trace.pt')
    p.add_argument('--compare', nargs=2, metavar=('A', 'B'))
    args = p.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    if args.iters < 1:
        p.error('--iters must be >= 1')
    sys.path.insert(0, REPO)
    from mmseg_proto.utils.output_files import OutputPathError, check_output_file
    try:  # never over the config it trains, nor a file it did not write
        out_folder = check_output_file(args.out, 'record_training_trace', dict(config=CONFIG))
    except OutputPathError as err:
        p.error(str(err))
    record(args.iters, args.out, out_folder)


if __name__ == '__main__':
    main()
