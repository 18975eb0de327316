"""Tests of the batched Sinkhorn-Knopp clustering."""
import pytest
import torch

from mmseg_proto.models.utils import sinkhorn_knopp


def reference_per_class(sims, labels, num_classes, eps=0.05, iters=3):
    """The reference code's structure: one small solve per class, fp64."""
    out = torch.zeros(len(labels), dtype=torch.long)
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).squeeze(1)
        if len(idx) == 0:
            continue
        q = torch.exp(sims[idx].double() / eps).t()  # K x B
        k, b = q.shape
        q /= q.sum()
        for _ in range(iters):
            q /= q.sum(dim=1, keepdim=True)
            q /= k
            q /= q.sum(dim=0, keepdim=True)
            q /= b
        q *= b
        out[idx] = q.t().argmax(dim=1)
    return out


@pytest.mark.parametrize('num_classes,k,n', [(3, 4, 300), (19, 10, 2000),
                                             (40, 10, 500)])
def test_matches_per_class_reference(num_classes, k, n):
    g = torch.Generator().manual_seed(num_classes * 7 + k)
    sims = torch.rand(n, k, generator=g) * 2 - 1
    labels = torch.randint(0, num_classes, (n, ), generator=g)
    assign, transport = sinkhorn_knopp(sims.double(), labels, num_classes)
    expected = reference_per_class(sims, labels, num_classes)
    assert torch.equal(assign, expected)
    # Every pixel fully assigned.
    torch.testing.assert_close(transport.sum(1),
                               torch.ones(n, dtype=transport.dtype))
    # fp32 gives the same assignments on these inputs.
    assign32, _ = sinkhorn_knopp(sims, labels, num_classes)
    assert (assign32 == expected).float().mean() > 0.999


def test_balanced_partition_when_pixels_plentiful():
    g = torch.Generator().manual_seed(1)
    k, n = 5, 5000
    # Biased similarities: plain argmax puts almost everything on prototype 0.
    sims = (torch.rand(n, k, generator=g) * 0.2 + 0.5)
    sims[:, 0] += 0.1
    labels = torch.zeros(n, dtype=torch.long)
    assert torch.bincount(sims.argmax(1), minlength=k)[0] > 0.6 * n
    assign, transport = sinkhorn_knopp(sims, labels, 1, num_iters=10)
    counts = torch.bincount(assign, minlength=k).float()
    assert counts.min() > 0.6 * n / k and counts.max() < 1.4 * n / k
    # Soft transport is balanced per prototype.
    torch.testing.assert_close(transport.sum(0), torch.full((k, ), n / k),
                               rtol=0.05, atol=0)


def test_balanced_per_class_with_reference_iterations():
    g = torch.Generator().manual_seed(2)
    sims = torch.nn.functional.normalize(torch.randn(4000, 16, generator=g),
                                         dim=1) @ torch.nn.functional.normalize(
                                             torch.randn(16, 10, generator=g),
                                             dim=0)
    labels = torch.randint(0, 4, (4000, ), generator=g)
    assign, _ = sinkhorn_knopp(sims, labels, 4)
    for c in range(4):
        counts = torch.bincount(assign[labels == c], minlength=10).float()
        n_c = (labels == c).sum().item()
        assert counts.min() > 0.5 * n_c / 10, counts
        assert counts.max() < 1.5 * n_c / 10, counts


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16,
                                   torch.bfloat16])
def test_no_overflow_near_unit_similarities(dtype):
    sims = torch.tensor([[1.0, 0.9999, -1.0], [-1.0, 1.0, 1.0],
                         [0.99, 0.98, 1.0]] * 50).to(dtype)
    labels = torch.tensor([0, 1, 2] * 50)
    assign, transport = sinkhorn_knopp(sims, labels, 5, epsilon=0.01)
    assert torch.isfinite(transport).all()
    assert transport.dtype == torch.float32
    assert assign.min() >= 0 and assign.max() < 3


def test_single_pixel_absent_classes_and_empty():
    one = torch.tensor([[0.1, 0.7, 0.3]])
    assign, transport = sinkhorn_knopp(one, torch.tensor([6]), 150)
    # A lone pixel is split evenly over the prototypes (balanced partition),
    # exactly as in the per-class reference.
    assert assign.tolist() == reference_per_class(one, torch.tensor([6]),
                                                  150).tolist()
    torch.testing.assert_close(transport.sum(), torch.tensor(1.0))
    assign, transport = sinkhorn_knopp(torch.zeros(0, 4),
                                       torch.zeros(0, dtype=torch.long), 3)
    assert assign.shape == (0, ) and transport.shape == (0, 4)


FUZZ_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.mark.parametrize('seed', range(40))
def test_fuzz_assignments_are_valid_and_finite(seed):
    """Classes, K, pixel counts, epsilons, iterations and dtypes at random: one prototype of
    the pixel's own class per pixel, a finite soft assignment whose rows sum to 1."""
    g = torch.Generator().manual_seed(seed)

    def randint(lo, hi):
        return int(torch.randint(lo, hi, (1, ), generator=g))

    c, k, n = randint(1, 40), randint(1, 12), randint(0, 3000)
    dtype = FUZZ_DTYPES[seed % len(FUZZ_DTYPES)]
    eps = (0.01, 0.05, 0.5)[seed % 3]
    sims = torch.rand(n, c * k, generator=g) * 2 - 1
    if seed % 5 == 0:  # all (nearly) equal to +-1
        sims = sims.sign() * (1 - 1e-3 * sims.abs())
    labels = torch.randint(0, c, (n, ), generator=g)
    if seed % 2:  # few classes dominate (classes with fewer pixels than K)
        labels = labels % max(1, c // 3)
    own = sims.to(dtype).view(n, c, k).gather(
        1, labels.view(-1, 1, 1).expand(-1, 1, k)).squeeze(1)
    assign, transport = sinkhorn_knopp(own, labels, c, eps, randint(1, 6))
    assert assign.shape == (n, ) and assign.dtype == torch.long
    assert n == 0 or (0 <= int(assign.min()) and int(assign.max()) < k)
    assert transport.dtype == (torch.float64 if dtype == torch.float64
                               else torch.float32)
    assert torch.isfinite(transport).all()
    if n:
        torch.testing.assert_close(
            transport.sum(1), torch.ones(n, dtype=transport.dtype),
            atol=1e-4, rtol=1e-4)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match='epsilon'):
        sinkhorn_knopp(torch.zeros(2, 2), torch.zeros(2), 1, epsilon=0)
    with pytest.raises(ValueError, match='num_iters'):
        sinkhorn_knopp(torch.zeros(2, 2), torch.zeros(2), 1, num_iters=0)
    with pytest.raises(ValueError, match='expected'):
        sinkhorn_knopp(torch.zeros(2, 2), torch.zeros(3), 1)
    with pytest.raises(ValueError, match=r'labels must be in \[0, 3\)'):
        sinkhorn_knopp(torch.zeros(2, 2), torch.tensor([0, 3]), 3)



@pytest.mark.parametrize('epsilon', [0.05, 0.005])
def test_exp_and_log_domain_paths_agree_with_reference(epsilon):
    # epsilon=0.005 spreads cosines over 400 nats: the log-domain path.
    g = torch.Generator().manual_seed(5)
    sims = torch.rand(600, 6, generator=g) * 2 - 1
    labels = torch.randint(0, 7, (600, ), generator=g)
    assign, transport = sinkhorn_knopp(sims, labels, 7, epsilon=epsilon)
    assert torch.isfinite(transport).all()
    expected = reference_per_class(sims, labels, 7, eps=epsilon) \
        if epsilon >= 0.02 else None
    if expected is not None:
        assert torch.equal(assign, expected)
    else:
        # fp64 log-domain run as the reference for tiny epsilon.
        ref64, _ = sinkhorn_knopp(sims.double(), labels, 7, epsilon=epsilon)
        assert (assign == ref64).float().mean() > 0.99


def _two_rank_worker(rank, init_file, sims, labels, num_classes, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{init_file}',
                            rank=rank, world_size=2)
    # Rank 0 gets the first 70% of the pixels, rank 1 the rest; rank 1 also
    # misses some classes entirely.
    cut = int(len(labels) * 0.7)
    part = slice(0, cut) if rank == 0 else slice(cut, None)
    assign, _ = sinkhorn_knopp(sims[part], labels[part], num_classes,
                               distributed=True)
    torch.save(assign, f'{out}.{rank}')
    # A rank with no pixel still takes part in the collectives.
    empty = sims[:0]
    sinkhorn_knopp(empty if rank else sims[:5],
                   labels[:0] if rank else labels[:5], num_classes,
                   distributed=True)
    dist.destroy_process_group()


def test_distributed_equals_single_process_on_global_batch(tmp_path):
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(3)
    # fp64: the only difference left is the summation order across ranks.
    sims = torch.rand(900, 10, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, 8, (900, ), generator=g)
    labels[630:][labels[630:] == 5] = 6  # class 5 only on rank 0
    mp.spawn(_two_rank_worker,
             args=(str(tmp_path / 'init'), sims, labels, 8,
                   str(tmp_path / 'assign')),
             nprocs=2)
    together = torch.cat([torch.load(tmp_path / 'assign.0'),
                          torch.load(tmp_path / 'assign.1')])
    single, _ = sinkhorn_knopp(sims, labels, 8)
    assert torch.equal(together, single)
    # Without synchronisation each rank would balance its own pixels only.
    local = torch.cat([sinkhorn_knopp(sims[:630], labels[:630], 8)[0],
                       sinkhorn_knopp(sims[630:], labels[630:], 8)[0]])
    assert not torch.equal(local, single)
