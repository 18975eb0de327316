"""Install mmseg_proto: ProtoSeg (CVPR 2022) as an MMSegmentation 1.x plugin."""
import os
import os.path as osp
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))
#: What goes into mmseg_proto/.mim, as MMSeg ships its own: the configs (for
#: `_base_ = ['mmseg_proto::...']` and `mim train mmseg_proto NAME.py`), the model index
#: (`mim search mmseg_proto`) and the tools `mim train/test mmseg_proto` run.
MIM_FILES = ('configs', 'model-index.yml', 'tools/train.py', 'tools/test.py',
             'tools/analysis_tools', 'tools/deployment', 'tools/model_converters',
             'tools/visualization')


def add_mim_extension() -> None:
    """Fill mmseg_proto/.mim from the repository: symbolic links for an editable install
    (so edits show at once), copies otherwise (what a wheel must hold)."""
    editable = any(cmd in sys.argv for cmd in ('develop', 'editable_wheel'))
    mim = osp.join(HERE, 'mmseg_proto', '.mim')
    for name in MIM_FILES:
        src, dst = osp.join(HERE, name), osp.join(mim, name)
        if not osp.exists(src):  # building from an sdist: already in place
            continue
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        os.makedirs(osp.dirname(dst), exist_ok=True)
        if editable:
            os.symlink(osp.relpath(src, osp.dirname(dst)), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        else:
            shutil.copyfile(src, dst)


def read_version() -> str:
    with open(osp.join(HERE, 'mmseg_proto', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


add_mim_extension()
setup(
    name='mmseg_proto',
    version=read_version(),
    description='ProtoSeg (nonparametric prototype segmentation) for MMSegmentation 1.x',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmseg_proto', 'mmseg_proto.*']),
    package_data={'mmseg_proto': ['.mim/model-index.yml', '.mim/configs/**/*.py',
                                  '.mim/configs/**/*.yaml', '.mim/configs/**/*.md',
                                  '.mim/tools/*.py', '.mim/tools/**/*.py']},
    python_requires='>=3.8',
    # The MMSeg stack is not required by distribution name: OpenMMLab's (mmsegmentation, mmcv,
    # mmengine) and OneDL's (onedl-mmsegmentation, onedl-mmcv, onedl-mmengine) install the
    # same modules, and a hard requirement on one would put it on top of the other. Importing
    # mmseg_proto checks the module versions instead (mmseg_proto/utils/stack_check.py).
    # tools/setup_env.sh installs the pinned known-good set (requirements/constraints.txt);
    # mmcv must be the full build with compiled ops (built with --no-build-isolation).
    install_requires=[
        'torch>=2.0',
        'numpy',
        'packaging',
        'ftfy',  # imported unconditionally by mmseg
        'regex',  # imported unconditionally by mmseg
    ],
    extras_require={
        # OpenMMLab's stack, for an environment that has none (pinned in
        # requirements/constraints.txt).
        'openmmlab': ['mmsegmentation>=1.2,<1.3', 'mmcv>=2.0.0rc4,<2.2.0',
                      'mmengine>=0.10,<0.11', 'openmim'],
        'tests': ['pytest', 'matplotlib', 'scikit-learn', 'onnx', 'onnxruntime',
                  'onnxscript'],
        # tools/deployment/pytorch2onnx.py (onnxscript: the dynamo exporter).
        'deploy': ['onnx', 'onnxruntime', 'onnxscript'],
        # tools/visualization/vis_prototype_similarity.py, tools/visualization/vis_embedding.py
        # (scikit-learn only for --method tsne; the tests install it too).
        'vis': ['matplotlib', 'scikit-learn'],
    },
    license='Apache-2.0',
    zip_safe=False,
)
