"""Every relative link and figure of the README and docs/ names a file of the repository."""
import glob
import os.path as osp
import re

import pytest

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
PAGES = [osp.join(REPO, 'README.md')] + sorted(glob.glob(osp.join(REPO, 'docs', '*.md')))
LINK = re.compile(r'\]\(([^)\s]+)\)')


@pytest.mark.parametrize('page', PAGES, ids=lambda p: osp.relpath(p, REPO))
def test_relative_links_exist(page):
    with open(page, encoding='utf-8') as f:
        text = f.read()
    missing = []
    for target in LINK.findall(text):
        if re.match(r'[a-z]+://|#|mailto:', target):
            continue
        path = osp.normpath(osp.join(osp.dirname(page), target.split('#')[0]))
        if not osp.exists(path):
            missing.append(target)
    assert not missing, f'{osp.relpath(page, REPO)} links to missing files: {missing}'


def test_readme_is_a_first_screen_not_a_manual():
    """The README stays short (set-up internals, test counts and the long benchmark
    narrative live in docs/)."""
    assert osp.getsize(osp.join(REPO, 'README.md')) <= 12 * 1024


def test_tests_named_in_the_reliability_page_exist():
    """Every test the reliability page names (``path::name`` or ``::name``) is defined, and
    every file it names exists: the page cannot point at a test that was renamed away."""
    with open(osp.join(REPO, 'docs', 'reliability.md'), encoding='utf-8') as f:
        text = f.read()
    defined = set()
    for path in glob.glob(osp.join(REPO, 'tests', '**', '*.py'), recursive=True):
        with open(path, encoding='utf-8') as f:
            defined |= set(re.findall(r'^\s*def (test_\w+)', f.read(), re.M))
    named = set(re.findall(r'::(test_\w+)', text)) | set(re.findall(r'`(test_\w+)`', text))
    assert named, 'the page names no test: the pattern is broken'
    missing = sorted(named - defined)
    assert not missing, f'docs/reliability.md names tests that do not exist: {missing}'
    files = set(re.findall(r'`(tests/[\w/]+\.py)', text))
    assert not [f for f in files if not osp.exists(osp.join(REPO, f))]
