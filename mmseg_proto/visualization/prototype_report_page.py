"""The static page of ``tools/analysis_tools/prototype_report.py``, from a gallery dict."""
import html
import os.path as osp
from typing import Any, Dict, List, Optional, Sequence
from urllib.parse import quote

from .prototype_gallery import REPORT_FILE, check_gallery, prototype_record

REPORT_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:16px 24px;color:#222;
 font-size:14px;max-width:1400px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:22px 0 4px}
.meta{color:#555;margin:2px 0}.note{color:#444;max-width:70em}
table{border-collapse:collapse}th,td{padding:3px 8px;text-align:left;vertical-align:middle}
thead th{border-bottom:1px solid #999;font-weight:600;font-size:13px}
tbody tr{border-bottom:1px solid #e3e3e3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #555;margin-right:5px;
 vertical-align:-1px}
.bar{display:inline-block;width:70px;height:8px;background:#eee;margin-right:6px}
.bar span{display:block;height:8px;background:#3b7dd8}
.flag{display:inline-block;padding:1px 5px;border-radius:3px;font-size:12px;margin:1px 0}
.dead{background:#fde2e1;color:#a11}.dup{background:#fff1c9;color:#7a5600}
tr.dead-row{color:#999}
.crops{white-space:nowrap}.crops figure{display:inline-block;margin:0 3px 0 0;text-align:center}
.crops img{display:block;width:64px;height:64px;border:1px solid #bbb}
.crops figcaption{font-size:11px;color:#555}
nav a{margin-right:10px}
"""


def _fmt(value: Optional[float], spec: str = '.2f') -> str:
    return '-' if value is None else format(value, spec)


def _swatch(rgb: Sequence[int]) -> str:
    return '<span class="swatch" style="background:rgb({},{},{})"></span>'.format(*rgb)


def untrained_class(gallery: Dict[str, Any], c: int) -> bool:
    """Whether training never moved any prototype of class ``c`` from its initialisation
    (every record of the class has ``untrained: true``; False when not known)."""
    k = gallery['num_prototypes']
    return all(prototype_record(gallery, c, j).get('untrained') is True for j in range(k))


def report_rows(gallery: Dict[str, Any], c: int) -> List[Dict[str, Any]]:
    """Class ``c``'s prototype records as the page lists them: most used first."""
    k = gallery['num_prototypes']
    rows = [prototype_record(gallery, c, j) for j in range(k)]
    return sorted(rows, key=lambda r: (-r['pixels'], r['prototype']))


def write_report_html(gallery: Dict[str, Any], out_dir: str,
                      title: str = 'Prototype report') -> str:
    """Write the static page ``out_dir/index.html`` for a gallery dict; return its path.

    A header with the split, the run and the health figures per class, then per class one
    row per prototype (most used first): use share, pixels, mean cosine, flags (dead:
    no pixel; near-duplicate: cosine above the threshold to another prototype) and its
    N crops. Images are the relative ``crops/`` files (URL-escaped): the page opens from
    disk. Prototypes that training never moved from their random initialisation (records
    with ``untrained: true``) are flagged, and a class whose prototypes all are gets no
    health figures: its pixels were filed under random vectors.

    Args:
        gallery (dict): From :func:`save_gallery` or :func:`load_gallery`.
        out_dir (str): Folder that holds ``gallery.json`` and ``crops/``.
        title (str): Page title. Default: 'Prototype report'.

    Raises:
        ValueError: if the gallery has a missing or mistyped entry, or a crop outside
            ``out_dir`` (:func:`~.prototype_gallery.check_gallery`); nothing is written.
    """
    esc = html.escape
    g = gallery
    check_gallery(g, root=out_dir)
    classes, palette, health = g['classes'], g['palette'], g['health']
    k = g['num_prototypes']
    parts = [f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
             f'<title>{esc(title)}</title><style>{REPORT_CSS}</style></head><body>',
             f'<h1>{esc(title)}</h1>']
    info = [f"checkpoint <code>{esc(str(g.get('checkpoint', '?')))}</code>",
            f"config <code>{esc(str(g.get('config', '?')))}</code>"]
    parts.append(f'<p class="meta">{", ".join(info)}</p>')
    seconds = g.get('seconds')
    per_image = (f" (at most {g['per_image']} per image)" if g.get('per_image') else '')
    timing = f', gallery pass {seconds:.0f} s' if isinstance(seconds, (int, float)) else ''
    parts.append(
        f"<p class=\"meta\">{esc(str(g.get('split', '?')))} split, {g['num_images']} images "
        f"(test pipeline: no random augmentation), {g['num_classes']} classes x {k} "
        f"prototypes, top {g['per_prototype']} pixels per prototype{per_image}, near-duplicate "
        f"cosine &gt; {g['duplicate_cosine']}{esc(timing)}</p>")
    parts.append(
        '<p class="note">Every labelled pixel (of the decoder\'s feature grid) is filed under '
        'the prototype of its own class nearest to it, the rule of inference. <b>Use</b>: '
        'share of the class\'s pixels filed under the prototype; <b>mean cos</b>: their mean '
        'cosine similarity to it; the crops are the filed pixels most similar to it '
        '(marked at the centre), most similar first. <span class="flag dead">dead</span>: no '
        'pixel filed; <span class="flag dup">near-duplicate</span>: another prototype\'s '
        'cosine to it is above the threshold; <span class="flag dead">never trained</span>: '
        'training never moved the prototype from its random initialisation (' +
        esc(str(g.get('untrained_check') or 'not checked for this gallery')) + '), so the '
        'pixels filed under it say nothing about what it learned.</p>')
    parts.append('<nav>' + ''.join(f'<a href="#class-{c}">{esc(name)}</a>'
                                   for c, name in enumerate(classes)) + '</nav>')
    # Health figures (tools/analysis_tools/prototype_health.py, same rule).
    parts.append('<h2>Health</h2><table class="health"><thead><tr><th>class</th>'
                 '<th>pixels</th><th>effective prototypes (&ge; 1%)</th>'
                 '<th>exp-entropy of use</th><th>cosine min / mean / max</th>'
                 '<th>dead</th><th>near-duplicates</th></tr></thead><tbody>')
    for c, name in enumerate(classes):
        recs = [prototype_record(g, c, j) for j in range(k)]
        dead = sum(r['dead'] for r in recs)
        dup = sum(bool(r['duplicates']) for r in recs)  # prototypes flagged, not pairs
        if untrained_class(g, c):
            figures = ('<td colspan="3"><span class="flag dead">never trained: random '
                       'prototypes</span></td>')
        else:
            figures = (f'<td class="num">{_fmt(health["effective"][c], ".0f")}</td>'
                       f'<td class="num">{_fmt(health["exp_entropy"][c])}</td>'
                       f'<td class="num">{_fmt(health["cos_min"][c])} / '
                       f'{_fmt(health["cos_mean"][c])} / {_fmt(health["cos_max"][c])}</td>')
        parts.append(
            f'<tr class="class-health" data-class="{c}"><td>{_swatch(palette[c])}'
            f'<a href="#class-{c}">{esc(name)}</a></td>'
            f'<td class="num">{g["class_pixels"][c]}</td>{figures}'
            f'<td class="num">{dead}</td><td class="num dup-count">{dup}</td></tr>')
    parts.append('</tbody></table>')
    for c, name in enumerate(classes):
        parts.append(f'<h2 id="class-{c}">{_swatch(palette[c])}{esc(name)}</h2>')
        pixels = g['class_pixels'][c]
        parts.append(f'<p class="meta">{pixels} labelled pixels'
                     + ('' if pixels else ': the class does not occur in these images, so '
                        'none of its prototypes is used') + '</p>')
        if untrained_class(g, c):
            parts.append('<p class="note untrained-class"><span class="flag dead">never '
                         'trained</span> Training never updated any prototype of this class '
                         '(e.g. a held-out class, or one absent from the training crops): '
                         'its pixels are filed under random prototypes, and the use and '
                         'crops below describe those, not anything learned.</p>')
        parts.append('<table class="prototypes"><thead><tr><th>prototype</th><th>use</th>'
                     '<th>pixels</th><th>mean cos</th><th>flags</th>'
                     '<th>most similar pixels filed under it</th></tr></thead><tbody>')
        for r in report_rows(g, c):
            flags = []
            if r['dead']:
                flags.append('<span class="flag dead">dead</span>')
            if r.get('untrained'):
                flags.append('<span class="flag dead untrained">never trained</span>')
            for d in r['duplicates']:
                flags.append(f'<span class="flag dup">near-duplicate of {esc(d["class_name"])}'
                             f' #{d["prototype"]} ({d["cosine"]:.3f})</span>')
            share = r['use_share'] or 0.0
            crops = []
            for e in r['top']:
                img = g['images'][e['image']]
                tip = (f"{osp.basename(str(img['path']))} (y {e['y']}, x {e['x']}), "
                       f"cos {e['similarity']:.3f}")
                crops.append(f'<figure><img class="crop" src="{esc(quote(e["crop"]))}" alt="'
                             f'{esc(tip)}" title="{esc(tip)}"><figcaption>'
                             f'{e["similarity"]:.2f}</figcaption></figure>')
            parts.append(
                f'<tr class="prototype{" dead-row" if r["dead"] else ""}" data-class="{c}" '
                f'data-prototype="{r["prototype"]}" data-pixels="{r["pixels"]}">'
                f'<td>{esc(name)} #{r["prototype"]}</td>'
                f'<td class="num"><span class="bar"><span style="width:{100 * share:.1f}%">'
                f'</span></span>{100 * share:.1f}%</td><td class="num">{r["pixels"]}</td>'
                f'<td class="num">{_fmt(r["mean_similarity"], ".3f")}</td>'
                f'<td>{"<br>".join(flags)}</td><td class="crops">{"".join(crops)}</td></tr>')
        parts.append('</tbody></table>')
    parts.append('</body></html>\n')
    path = osp.join(out_dir, REPORT_FILE)
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(parts))
    return path
