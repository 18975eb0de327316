"""No import runs upward from ``mmseg_proto.models``: the models are what evaluation, the
training hooks, the APIs and the tools build on, never the other way round (issue 30)."""
import ast
import os.path as osp
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / 'mmseg_proto' / 'models'
# The packages that import the models: none of them may be imported from the models.
ABOVE = tuple(f'mmseg_proto.{name}'
              for name in ('evaluation', 'engine', 'apis', 'visualization', 'tools'))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> List[str]:
    """Every module ``source`` (the code of ``module``) imports, anywhere in it (function
    bodies included), relative imports resolved; ``from a import b`` gives ``a`` and
    ``a.b``; ``importlib.import_module('x')`` and ``__import__('x')`` give ``x``."""
    package = module.split('.') if is_package else module.split('.')[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = '.'.join(base + (node.module.split('.') if node.module else []))
            found += [name] + [f'{name}.{alias.name}' for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == 'import_module')
                   or (isinstance(node.func, ast.Name) and node.func.id == '__import__'))):
            found.append(node.args[0].value)
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> List[str]:
    """The imports of ``source`` that reach a package above the models."""
    return sorted({name for name in imported_modules(source, module, is_package)
                   if any(name == above or name.startswith(above + '.') for above in ABOVE)})


def test_no_module_under_models_imports_a_package_above_it():
    files = sorted(MODELS.rglob('*.py'))
    assert len(files) > 10, f'expected the model sources under {MODELS}'
    problems = []
    for path in files:
        found = upward_imports(path.read_text(encoding='utf-8'), _module_name(path),
                               path.name == '__init__.py')
        problems += [f'{osp.relpath(path, REPO)} imports {name}' for name in found]
    assert not problems, ('mmseg_proto.models must not import the packages built on it '
                          '(move the shared code into models):\n' + '\n'.join(problems))


def test_the_scan_finds_every_form_of_upward_import():
    module = 'mmseg_proto.models.utils.prototype_statistics'
    planted = {
        'def f():\n    from ...evaluation.prototype_health import prototype_health\n':
        'mmseg_proto.evaluation.prototype_health',
        'from ... import engine\n': 'mmseg_proto.engine',
        'import mmseg_proto.engine.hooks\n': 'mmseg_proto.engine.hooks',
        'from mmseg_proto.evaluation import anomaly_metrics\n': 'mmseg_proto.evaluation',
        'import importlib\nimportlib.import_module("mmseg_proto.apis")\n':
        'mmseg_proto.apis',
    }
    for source, name in planted.items():
        assert name in upward_imports(source, module), source
    # Relative imports within the models, mmseg's and the evaluation's namesakes are fine.
    for source in ('from .prototype_index import buffer_index\n',
                   'from ..losses import PixelPrototypeContrastLoss\n',
                   'from mmseg.evaluation import IoUMetric\n',
                   'from mmseg_proto.evaluationx import y\n'):
        assert upward_imports(source, module) == [], source
    # In a package's __init__, '.' is the package itself.
    assert upward_imports('from ..evaluation import x\n', 'mmseg_proto.models.utils',
                          is_package=True) == []
    assert upward_imports('from ..evaluation import x\n', 'mmseg_proto.models',
                          is_package=True) == ['mmseg_proto.evaluation',
                                               'mmseg_proto.evaluation.x']
