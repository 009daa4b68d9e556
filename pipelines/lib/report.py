"""The evaluation report: a self-contained HTML page (table, IoU histograms, a worst-case gallery),
its pieces shared with the quickstart's report."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np


def png_b64(arr: np.ndarray) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def histogram_counts(counts: dict[str, np.ndarray], path: Path, means: dict[str, float]) -> None:
    """Per-image IoU histograms from counts per bin (equal bins over [0, 1]), one line per method,
    labelled with its mean IoU (%)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, c in counts.items():
        c = np.asarray(c)
        bins = np.linspace(0, 100, len(c) + 1)
        ax.stairs(c, bins, linewidth=1.8, label=f"{name} (mean {means[name]:.1f})")
    ax.set_xlabel("per-image IoU (%)")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tile(image: np.ndarray, gt: np.ndarray, pred: np.ndarray, height: int = 96) -> np.ndarray:
    """image | ground truth | prediction over the image (red = predicted fg), each `height` pixels
    high: small model-resolution images enlarged (nearest), photos shrunk (area), so a row of
    triples fits the page."""
    from PIL import Image
    from pipelines.lib.mask_files import overlay
    over = overlay(image, pred, min_size=1)
    gt_rgb = np.repeat((np.asarray(gt) * 255).astype(np.uint8)[..., None], 3, 2)
    strip = np.concatenate([image, np.full((image.shape[0], 2, 3), 255, np.uint8), gt_rgb,
                            np.full((image.shape[0], 2, 3), 255, np.uint8), over], 1)
    h, w = strip.shape[:2]
    size = (max(1, round(w * height / h)), height)
    resample = Image.Resampling.NEAREST if height >= h else Image.Resampling.BOX
    return np.asarray(Image.fromarray(strip).resize(size, resample))


def img_tag(png_path: Path, css: str = "") -> str:
    data = base64.b64encode(Path(png_path).read_bytes()).decode()
    return f"<img {css} src='data:image/png;base64,{data}'>"


def write_report(path: Path, *, title: str, table: list[dict], coverage: dict, hist_png: Path,
                 gallery: list[dict], notes: list[str], sections: list[tuple[str, str]] = ()) -> None:
    """A self-contained HTML page; `sections` are extra (heading, HTML body) blocks shown first."""
    splits = sorted({r["split"] for r in table})
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["split"]): r for r in table}
    head = "".join(f"<th colspan=2>{html.escape(s)}</th>" for s in splits)
    sub = "".join("<th>IoU</th><th>Dice</th>" for _ in splits)
    rows = []
    for m in methods:
        tds = "".join(f"<td>{cell[(m, s)]['iou']:.1f}</td><td>{cell[(m, s)]['dice']:.1f}</td>" if (m, s) in cell
                      else "<td>–</td><td>–</td>" for s in splits)
        rows.append(f"<tr><th>{html.escape(m)}</th>{tds}</tr>")
    cov = "".join(f"<li>{html.escape(k)}: {v}</li>" for k, v in coverage.items())
    gal = "".join(f"<figure><img class=px src='data:image/png;base64,{g['png']}'><figcaption>"
                  f"{html.escape(str(g['key']))} — IoU {g['iou']:.1f}</figcaption></figure>" for g in gallery)
    extra = "".join(f"<h2>{html.escape(h)}</h2>{body}" for h, body in sections)
    note = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:4px 10px;text-align:right}} th{{background:#f3f3f3}}
img.px{{image-rendering:pixelated}} figure{{display:inline-block;margin:6px;max-width:100%}}
figure img{{max-width:100%;height:auto}}
figcaption{{font-size:12px}}</style></head><body>
<h1>{html.escape(title)}</h1>{extra}
<h2>IoU / Dice (%), per-image mean</h2>
<table id="results"><tr><th rowspan=2>method</th>{head}</tr><tr>{sub}</tr>{''.join(rows)}</table>
<h3>Coverage</h3><ul>{cov}</ul><ul>{note}</ul>
<h2>Per-image IoU</h2>{img_tag(hist_png)}
<h2>Worst cases ({html.escape(methods[0]) if methods else ''}): image | ground truth | prediction</h2>{gal}
</body></html>""")
