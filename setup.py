"""Install mmseg_proto: ProtoSeg (CVPR 2022) as an MMSegmentation 1.x plugin."""
import os.path as osp
import re

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    with open(osp.join(HERE, 'mmseg_proto', 'version.py')) as f:
        return re.search(r"__version__ = '([^']+)'", f.read()).group(1)


setup(
    name='mmseg_proto',
    version=read_version(),
    description='ProtoSeg (nonparametric prototype segmentation) for MMSegmentation 1.x',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['mmseg_proto', 'mmseg_proto.*']),
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
