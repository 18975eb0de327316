"""The tables the README's accuracy and anomaly claims are copied from
(benchmarks/camvid_benchmark.py, benchmarks/camvid_anomaly.py), checked on made-up records
against hand computations: mean and sample standard deviation over seeds, per-class means,
the mean over held-out classes (of per-class means, not pooled over runs), the seen-class
mIoU, and the refusal of a class that CamVid does not have; and the resume rules the long
runs rely on (a finished run of another schedule or a half-written record in --out is named
before anything trains; records are written atomically)."""
import glob
import importlib.util
import json
import os.path as osp
import re
import sys

import numpy as np
import pytest
from conftest import REPO

CLASSES = ['sky', 'building', 'pole', 'road', 'sidewalk', 'tree', 'sign', 'fence', 'car',
           'pedestrian', 'bicyclist']


def load(name):
    path = osp.join(REPO, 'benchmarks', f'{name}.py')
    spec = importlib.util.spec_from_file_location(f'bench_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(variant, seed, miou, per_class, health=None, **extra):
    return dict(variant=variant, seed=seed, iters=4000, mIoU=miou, aAcc=80.0 + seed,
                per_class=list(per_class), classes=CLASSES, params=3716000,
                s_per_iter=0.5, peak_rss_mb=800.0, health=health, **extra)


def row(table, first_cells):
    """The Markdown row whose leading cells are ``first_cells``."""
    prefix = '| ' + ' | '.join(first_cells) + ' |'
    rows = [line for line in table.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, table)
    return [cell.strip() for cell in rows[0].strip('|').split('|')]


def test_accuracy_table_mean_sample_std_per_class_and_health():
    bench = load('camvid_benchmark')
    rng = np.random.default_rng(0)
    mious = {'parametric': [51.00, 50.10, 49.70], 'protoseg': [50.25, 51.30]}
    per_class = {v: rng.uniform(0, 100, size=(len(m), 11)) for v, m in mious.items()}
    effective = [6.2, 5.0]
    records = [record(v, s, m, per_class[v][s],
                      health=None if v == 'parametric' else dict(
                          effective=effective[s], exp_entropy=4.0 + s, cos_mean=0.4))
               for v, ms in mious.items() for s, m in enumerate(ms)]
    table = bench.aggregate(records, ['parametric', 'protoseg'])
    main_table = table.split('| model | sky')[0]
    for variant, values in mious.items():
        cells = row(main_table, [variant, str(len(values))])
        mean, std = np.mean(values), np.std(values, ddof=1)  # sample std over seeds
        assert cells[2].startswith(f'{mean:.2f} ± {std:.2f} ('), cells
        assert cells[3] == f'{np.mean([80.0 + s for s in range(len(values))]):.2f}'
        per_class_table = table.split('| model | sky')[1].split('Prototype health')[0]
        class_cells = row(per_class_table, [variant])
        assert class_cells[1:] == [
            f'{x:.1f} ± {sd:.1f}' for x, sd in zip(per_class[variant].mean(axis=0),
                                                  per_class[variant].std(axis=0, ddof=1))]
    header = [line for line in table.splitlines() if line.startswith('| model | sky')]
    assert header == ['| model | ' + ' | '.join(CLASSES) + ' |']
    health_table = table.split('Prototype health')[1]
    health = row(health_table, ['protoseg', '2', f'{np.mean(effective):.1f} ± '
                                f'{np.std(effective, ddof=1):.1f}'])
    assert health[3] == f'{4.5:.2f} ± {np.std([4.0, 5.0], ddof=1):.2f}'
    # The parametric model has no prototypes: no health row.
    assert '| parametric |' not in health_table


def test_one_seed_reports_no_spread():
    bench = load('camvid_benchmark')
    table = bench.aggregate([record('protoseg K=1', 0, 36.87, [50.0] * 11)],
                            ['protoseg K=1'])
    assert row(table.split('| model | sky')[0], ['protoseg K=1', '1'])[2] == '36.87 ± 0.00 (36.87)'
    assert row(table.split('| model | sky')[1], ['protoseg K=1'])[1:] == ['50.0'] * 11


def test_health_of_one_prototype_per_class_shows_no_cosine():
    """K = 1: no pair of prototypes, the cosine between them is NaN for every run."""
    bench = load('camvid_benchmark')
    health = dict(effective=1.0, exp_entropy=1.0, cos_mean=float('nan'))
    table = bench.aggregate([record('protoseg K=1', s, 50.0 + s, [50.0] * 11, health=health)
                             for s in range(3)], ['protoseg K=1'])
    assert row(table.split('Prototype health')[1], ['protoseg K=1', '3'])[2:] == [
        '1.0 ± 0.0', '1.00 ± 0.00', '-']
    assert 'nan' not in table


def anomaly_record(model, cls, seed, scores, per_class, health=None):
    rec = record(f'{model} no-{cls}', seed, 0.0, per_class, held_out=cls,
                 anomaly={name: dict(auroc=a, aupr=a / 2, fpr95=1 - a)
                          for name, a in scores.items()})
    rec['iters'] = 1000
    if health is not None:
        rec['health'] = health
    else:
        rec.pop('health')
    return rec


def test_anomaly_mean_over_held_out_classes_is_of_class_means():
    anomaly = load('camvid_anomaly')
    per_class = np.linspace(10, 60, 11)
    health = dict(effective=5.0, exp_entropy=4.0, cos_mean=0.3)
    # car: 3 seeds, pedestrian: 1 seed; a pooled mean over the 4 runs would differ.
    records = [
        anomaly_record('protoseg', 'car', 0, {'prototype': 0.90, 'energy': 0.70}, per_class,
                       health),
        anomaly_record('protoseg', 'car', 1, {'prototype': 0.80, 'energy': 0.72}, per_class,
                       health),
        anomaly_record('protoseg', 'car', 2, {'prototype': 0.85, 'energy': 0.74}, per_class,
                       health),
        anomaly_record('protoseg', 'pedestrian', 0, {'prototype': 0.60, 'energy': 0.90},
                       per_class, health),
        anomaly_record('parametric', 'car', 0, {'energy': 0.81}, per_class),
    ]
    table = anomaly.table(records, ['car', 'pedestrian'])
    car = row(table, ['protoseg', 'prototype', '85.0 ± 5.0 (90.0, 80.0, 85.0)'])
    seen = np.mean([iou for c, iou in zip(CLASSES, per_class) if c != 'car'])
    assert car[-1] == f'{seen:.2f} ± 0.00'  # three equal seeds: spread 0, car left out
    summary = table.split('### Mean over held-out classes')[1]
    proto = row(summary, ['protoseg', 'prototype'])
    assert proto[2] == f'{np.mean([85.0, 60.0]):.1f}' and proto[-1] == '2'
    energy = row(summary, ['protoseg', 'energy'])
    assert energy[2] == f'{np.mean([72.0, 90.0]):.1f}'
    assert energy[4] == f'{np.mean([100 * (1 - 0.72), 100 * (1 - 0.90)]):.1f}'
    # Only one class for the parametric model: its count says so.
    assert row(summary, ['parametric', 'energy'])[-1] == '1'
    # Rows best AUROC first.
    aurocs = [float(line.split('|')[3]) for line in summary.splitlines()
              if re.match(r'\| (protoseg|parametric) \|', line)]
    assert aurocs == sorted(aurocs, reverse=True)


def test_an_unknown_held_out_class_is_refused_by_name(monkeypatch, capsys, tmp_path):
    anomaly = load('camvid_anomaly')
    monkeypatch.setattr(sys, 'argv', ['camvid_anomaly.py', '--held-out', 'car', 'cars',
                                      '--out', str(tmp_path)])

    def no_training(*args, **kwargs):
        raise AssertionError(f'started {args[0][:3]} instead of refusing the class')
    monkeypatch.setattr(anomaly.subprocess, 'run', no_training)
    with pytest.raises(SystemExit) as exc:
        anomaly.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert '--held-out cars: not CamVid classes' in err and 'pedestrian' in err
    assert not list(tmp_path.iterdir())  # nothing trained or written


def no_training(*args, **kwargs):
    raise AssertionError(f'started {args[0][:4]} instead of refusing')


def run_main(module, monkeypatch, argv):
    monkeypatch.setattr(sys, 'argv', [f'{module.__name__}.py'] + argv)
    monkeypatch.setattr(module.subprocess, 'run', no_training)
    with pytest.raises(SystemExit) as exc:
        module.main()
    assert exc.value.code == 2
    return exc


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_run_of_another_schedule_in_out_is_refused_before_training(
        tmp_path, monkeypatch, capsys):
    """--iters 4000 with --out holding 1000-iteration runs: the old code skipped them as
    finished and left them out of the table, silently."""
    bench = load('camvid_benchmark')
    write(tmp_path / 'work' / 'protoseg_s1' / 'record.json',
          json.dumps(record('protoseg', 1, 35.0, [1.0] * 11) | dict(iters=1000)))
    run_main(bench, monkeypatch, ['--iters', '4000', '--variants', 'parametric', 'protoseg',
                                  '--seeds', '0', '1', '--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert 'protoseg_s1/record.json is a 1000-iteration run, this call asks for 4000' in err
    assert 'use another --out' in err
    assert not (tmp_path / 'work' / 'parametric_s0').exists()


def test_a_half_written_record_is_named_not_resumed(tmp_path, monkeypatch, capsys):
    bench = load('camvid_benchmark')
    write(tmp_path / 'work' / 'parametric_s0' / 'record.json', '{"variant": "parame')
    run_main(bench, monkeypatch, ['--iters', '10', '--variants', 'parametric', '--seeds', '0',
                                  '--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert 'parametric_s0/record.json is not a finished run' in err
    assert 'delete its folder to run it again' in err


@pytest.mark.parametrize('argv', [['--iters', '0'], ['--jobs', '0'], ['--threads', '0']])
def test_benchmark_refuses_counts_below_one(tmp_path, monkeypatch, capsys, argv):
    bench = load('camvid_benchmark')
    run_main(bench, monkeypatch, argv + ['--variants', 'parametric', '--out', str(tmp_path)])
    assert '--iters, --jobs and --threads must be >= 1' in capsys.readouterr().err


def test_anomaly_scores_of_another_schedule_are_refused(tmp_path, monkeypatch, capsys):
    anomaly = load('camvid_anomaly')
    work = tmp_path / 'work' / 'protoseg_no-car_s0'
    rec = record('protoseg no-car', 0, 30.0, [1.0] * 11)
    write(work / 'record.json', json.dumps(rec | dict(iters=1000)))
    write(work / 'anomaly.json', json.dumps(rec | dict(iters=4000)))
    run_main(anomaly, monkeypatch, ['--iters', '1000', '--held-out', 'car', '--seeds', '0',
                                    '--models', 'protoseg', '--out', str(tmp_path)])
    assert ('anomaly.json is a 4000-iteration run, this call asks for 1000'
            in capsys.readouterr().err)


def test_write_json_keeps_the_old_file_when_writing_fails(tmp_path):
    bench = load('camvid_benchmark')
    path = tmp_path / 'record.json'
    bench.write_json(str(path), dict(iters=5))
    with pytest.raises(TypeError):
        bench.write_json(str(path), dict(iters=6, bad=object()))
    assert json.loads(path.read_text()) == dict(iters=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['record.json']


# Issue 28 section 6: records are checked once, key by key, before anything trains.

def bench_record(variant, seed, iters=10, **changes):
    rec = record(variant, seed, 40.0, [1.0] * 11) | dict(iters=iters)
    return rec | changes


def put(tmp_path, folder, rec, name='record.json'):
    write(tmp_path / 'work' / folder / name,
          rec if isinstance(rec, str) else json.dumps(rec))


@pytest.mark.parametrize('folder,content,named', [
    ('parametric_s0', {'iters': 10}, "'variant' is missing; 'seed' is missing"),
    ('parametric_s0', bench_record('parametric', 0, iters='10'),
     "'iters' is '10' (must be an integer >= 1)"),
    ('parametric_s0', bench_record('parametric', 0, per_class=[1.0] * 3),
     "'per_class' has 3 values for 11 classes"),
    ('parametric_s0', bench_record('parametric', 0, health={'effective': 'x'}),
     "'health' is {'effective': 'x'} (must be null or a dict of numbers"),
    ('parametric_s0', bench_record('parametric', 0, mIoU=None),
     "'mIoU' is None (must be a number)"),
    ('parametric_s0', '[1, 2]', 'it holds a JSON list, not an object'),
    ('parametric_s0', bench_record('protoseg', 0),
     "is the record of 'protoseg' seed 0, whose folder is protoseg_s0, not parametric_s0"),
    # A stale partial record of a variant this call does not run: it would be read for the
    # tables after training.
    ('protoseg_K=1_s0', {'iters': 10}, "'variant' is missing"),
])
def test_a_record_that_cannot_be_used_is_named_before_training(
        tmp_path, monkeypatch, capsys, folder, content, named):
    bench = load('camvid_benchmark')
    put(tmp_path, folder, content)
    run_main(bench, monkeypatch, ['--iters', '10', '--variants', 'parametric', '--seeds', '0',
                                  '--out', str(tmp_path)])
    err = capsys.readouterr().err
    assert f'{folder}/record.json is ' in err and named in err, err
    assert 'delete its folder to run it again' in err
    assert 'this call asks for' not in err


def test_finished_records_are_tabled_and_other_schedules_left_out(tmp_path, monkeypatch):
    bench = load('camvid_benchmark')
    put(tmp_path, 'parametric_s0', bench_record('parametric', 0, iters=10))
    put(tmp_path, 'protoseg_s0', bench_record('protoseg', 0, iters=20))
    monkeypatch.setattr(sys, 'argv', ['camvid_benchmark.py', '--iters', '10', '--variants',
                                      'parametric', '--seeds', '0', '--out', str(tmp_path)])
    monkeypatch.setattr(bench.subprocess, 'run', no_training)
    bench.main()
    records = json.loads((tmp_path / 'records.json').read_text())
    assert [(r['variant'], r['iters']) for r in records] == [('parametric', 10)]
    assert '| parametric | 1 |' in (tmp_path / 'results.md').read_text()


def test_the_shipped_records_pass_the_checks():
    """Every record the README's numbers come from is a valid record (earlier versions'
    records lack 'health')."""
    bench = load('camvid_benchmark')
    paths = sorted(glob.glob(osp.join(REPO, 'benchmarks', 'results', '*', 'work', '*',
                                      'record.json')))
    for path in paths:
        bench.read_record(path)
    for name in ('camvid_records.json', 'camvid_anomaly_records.json',
                 'camvid_anomaly_heldout_records.json'):
        path = osp.join(REPO, 'benchmarks', 'results', name)
        if osp.exists(path):
            keys = bench.ANOMALY_KEYS if 'anomaly' in name else bench.RECORD_KEYS
            with open(path) as f:
                for rec in json.load(f):
                    assert bench.record_problems(rec, keys) == [], (name, rec['variant'])


def test_anomaly_report_only_on_a_missing_out_is_named(tmp_path, monkeypatch, capsys):
    anomaly = load('camvid_anomaly')
    out = tmp_path / 'no_such_folder'
    run_main(anomaly, monkeypatch, ['--report-only', '--held-out', 'car', '--out', str(out)])
    err = capsys.readouterr().err
    assert f'--out {out}: no such folder' in err and 'FileNotFoundError' not in err
    assert not out.exists()


def anomaly_json(model, cls, seed, iters=10, **changes):
    rec = bench_record(f'{model} no-{cls}', seed, iters, held_out=cls, anomaly_pixels=5,
                       pixels=100, anomaly={'energy': dict(auroc=0.8, aupr=0.3, fpr95=0.5,
                                                           positives=5, negatives=95)})
    return rec | changes


@pytest.mark.parametrize('content,named', [
    ({'iters': 10}, "'variant' is missing"),
    (anomaly_json('protoseg', 'car', 0, iters='10'), "'iters' is '10'"),
    (anomaly_json('protoseg', 'car', 0, anomaly={'energy': {'auroc': 0.5}}),
     "'anomaly' is {'energy': {'auroc': 0.5}} (must be a dict: score name"),
    (anomaly_json('protoseg', 'car', 0, held_out='pedestrian'),
     "scores held-out class 'pedestrian', its folder is a run without 'car'"),
])
def test_anomaly_scores_that_cannot_be_used_are_named(tmp_path, monkeypatch, capsys, content,
                                                      named):
    anomaly = load('camvid_anomaly')
    put(tmp_path, 'protoseg_no-car_s0', content, 'anomaly.json')
    for argv in (['--report-only'], []):
        run_main(anomaly, monkeypatch, argv + [
            '--iters', '10', '--held-out', 'car', '--seeds', '0', '--models', 'protoseg',
            '--out', str(tmp_path)])
        err = capsys.readouterr().err
        assert 'protoseg_no-car_s0/anomaly.json is' in err or 'anomaly.json scores' in err
        assert named in err and 'delete it to score the run again' in err, err
    assert not (tmp_path / 'anomaly_results.md').exists()


def test_anomaly_report_only_tables_the_scored_runs(tmp_path, monkeypatch, capsys):
    anomaly = load('camvid_anomaly')
    put(tmp_path, 'protoseg_no-car_s0', anomaly_json('protoseg', 'car', 0), 'anomaly.json')
    argv = ['--report-only', '--iters', '10', '--held-out', 'car', 'pedestrian', '--seeds',
            '0', '--models', 'protoseg', '--out', str(tmp_path)]
    monkeypatch.setattr(sys, 'argv', ['camvid_anomaly.py'] + argv)
    monkeypatch.setattr(anomaly.subprocess, 'run', no_training)
    anomaly.main()
    assert 'not scored yet, left out' in capsys.readouterr().out
    assert '| protoseg | energy | 80.0 (80.0) |' in (
        tmp_path / 'anomaly_results.md').read_text()
    # Nothing scored for this call: refused, not an empty table.
    run_main(anomaly, monkeypatch, argv[:4] + ['pedestrian'] + argv[6:])
    assert 'no run of this call is scored' in capsys.readouterr().err


def test_prototype_use_checks_records_before_the_health_pass(tmp_path, monkeypatch, capsys):
    use = load('camvid_prototype_use')

    def no_health(*args):
        raise AssertionError('measured health instead of refusing')
    monkeypatch.setattr(use, 'health_of_run', no_health)

    def refused(argv):
        monkeypatch.setattr(sys, 'argv', ['camvid_prototype_use.py'] + argv)
        with pytest.raises(SystemExit) as exc:
            use.main()
        assert exc.value.code == 2
        return capsys.readouterr().err

    err = refused(['--out', str(tmp_path / 'none'), '--variants', 'protoseg'])
    assert "no 'work' folder of camvid_benchmark.py runs" in err
    put(tmp_path, 'protoseg_s0', {'iters': 10})
    err = refused(['--out', str(tmp_path), '--variants', 'protoseg'])
    assert "protoseg_s0/record.json is not a finished run: 'variant' is missing" in err
    put(tmp_path, 'protoseg_s0', bench_record('protoseg', 0, iters=10))
    put(tmp_path, 'protoseg_s1', bench_record('protoseg', 1, iters=20))
    err = refused(['--out', str(tmp_path), '--variants', 'protoseg'])
    assert 'holds runs of [10, 20] iterations' in err and 'pass --iters' in err
    err = refused(['--out', str(tmp_path), '--variants', 'protoseg K=1'])
    assert "no finished run of ['protoseg K=1']" in err
