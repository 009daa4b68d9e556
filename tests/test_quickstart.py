"""The README's main job, end to end, in its own process and Ray instance (as a user runs it), and
its report opened in a real headless browser. One quickstart run serves every test here."""
import base64
import binascii
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from pipelines import evaluate
from tests import browser as chromium
from tests.test_train_cluster import _env

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
SHOT = (1280, 3000)   # CSS px: the whole tiny report (tables, figures, the worst-case gallery)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "qs"
    drc = Path(sys.executable).parent / "drc"                # the README's command (setup.sh installs it)
    proc = subprocess.run([str(drc), "quickstart", "--tiny", "--iterations", "10", "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    return proc, out


def _succeeded(quickstart):
    proc, out = quickstart
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_quickstart_tiny_runs_every_stage_and_writes_the_report(quickstart):
    proc, out = _succeeded(quickstart)
    summary = json.loads((out / "quickstart.json").read_text())
    assert set(summary["seconds"]) == {"preprocess", "train", "distill", "segment", "evaluate"}
    html = (out / "report" / "report.html").read_text()
    for needle in ('id="results"', "langevin", "amortized", "GrabCut", "Learning curves", "Samples"):
        assert needle in html
    for mode in ("langevin", "amortized"):
        manifest = json.loads((out / f"seg-{mode}" / "_manifest.json").read_text())
        assert manifest["mode"] == mode and manifest["counts"]["ok"] == 64
    assert "mlflow ui --backend-store-uri" in proc.stdout


NOISE = {  # what a successful run must not print (issue 19): alarms that are not problems
    "Ray E-level line": re.compile(r"\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]"),
    "MLflow type-hint warning": re.compile(r"Add type hints to the `predict` method"),
    "MLflow input-example warning": re.compile(r"An input example was not provided"),
    "Ray Data progress-bar warning": re.compile(r"Progress bars disabled"),
    "a deprecation warning about our own calls": re.compile(r"DeprecationWarning"),
    "Ray Train's per-report metrics dump": re.compile(r"Reporting training result \d+: TrainingReport"),
    "Ray Train's per-checkpoint INFO line": re.compile(r"Checkpoint successfully created"),
    "MLflow's progress bar for copying a logged model back": re.compile(r"Downloading artifacts"),
}


def test_a_successful_quickstart_prints_progress_not_alarms(quickstart):
    proc, _ = _succeeded(quickstart)
    lines = (proc.stdout + proc.stderr).splitlines()
    found = {name: [x[:200] for x in lines if pattern.search(x)] for name, pattern in NOISE.items()}
    assert not any(found.values()), {k: v for k, v in found.items() if v}
    stages = [tuple(map(int, m.groups())) for x in lines if (m := re.match(r"\[(\d+)/(\d+)\] ", x))]
    assert stages == [(i, 5) for i in range(1, 6)], stages          # every stage announces itself, counted right
    progress = [x for x in lines if "[drc-train] iteration" in x]
    assert progress and all(re.search(r"it/s=[\d.]+ eta=\d+(s|m\d\ds|h\d\dm)$", x) for x in progress), progress[-3:]


@pytest.fixture(scope="module")
def browser():
    found = chromium.find_browser()
    if found is None:
        where = (f"DRC_BROWSER={os.environ['DRC_BROWSER']} is not an executable" if os.environ.get("DRC_BROWSER")
                 else f"no headless Chromium on PATH (looked for {', '.join(chromium.NAMES)}; DRC_BROWSER overrides)")
        why = (f"{where}: "
               "`bash setup.sh` installs chromium-headless-shell as root on Debian, "
               "or `sudo apt-get install chromium-headless-shell`")
        if chromium.in_ci():
            pytest.fail(f"CI=true and {why}")
        pytest.skip(why)
    return found


def _image_loads(src: str, base: Path) -> tuple[int, int]:
    """The (width, height) of what an <img src> points at; fails when it is missing or no image."""
    from PIL import Image
    if src.startswith("data:"):
        header, sep, payload = src.partition(",")
        assert sep and header.endswith(";base64") and header[5:].startswith("image/"), f"odd data URI {header!r}"
        try:
            raw = base64.b64decode(payload, validate=True)
        except binascii.Error as exc:
            pytest.fail(f"data URI is not valid base64: {exc}")
    else:
        parsed = urlparse(src)
        assert parsed.scheme in ("", "file"), f"<img src={src!r}> is not a local file (the report must be self-contained)"
        path = Path(unquote(parsed.path)) if parsed.scheme == "file" else base / unquote(parsed.path)
        assert path.is_file(), f"<img src={src!r}> → {path} does not exist"
        raw = path.read_bytes()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()                   # decodes every pixel: a truncated file raises here
            return im.size
    except (OSError, SyntaxError) as exc:   # PIL's UnidentifiedImageError is an OSError
        pytest.fail(f"<img src={src[:60]!r}...> does not decode as an image: {exc}")


def test_the_report_renders_in_a_real_headless_browser(browser, quickstart):   # browser first: fail fast
    _, out = _succeeded(quickstart)
    from PIL import Image
    report = out / "report" / "report.html"
    metrics = json.loads((out / "report" / "metrics.json").read_text())

    # What a person sees: a screenshot, kept next to the report.
    png = chromium.screenshot(browser, report, report.with_name("report.png"), *SHOT)
    print(f"screenshot of the report: {png}")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == SHOT, (im.format, im.size)
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, f"the screenshot is (nearly) blank: grey-level std {pixels.std():.1f}"
    assert 0.02 < (pixels < 200).mean() < 0.9, f"{(pixels < 200).mean():.1%} of the screenshot is dark"
    assert (pixels.std(axis=1) > 1).mean() > 0.3, "most rows of the screenshot are a single colour"

    # What the browser built: the IoU/Dice table with every method and the numbers of metrics.json.
    dom = chromium.Dom(chromium.dump_dom(browser, report))
    assert "results" in dom.tables, f"no <table id=results> in the rendered DOM (tables: {list(dom.tables)})"
    rows = dom.tables["results"]
    splits = list(dict.fromkeys(r["split"] for r in metrics["table"]))
    assert splits == ["test"]
    assert [t for t, _ in rows[0]] == ["th"] * (1 + len(splits))
    assert [text for _, text in rows[0]] == ["method", *splits]
    assert [text for _, text in rows[1]] == ["IoU", "Dice"] * len(splits)
    body = {row[0][1]: row[1:] for row in rows[2:]}
    methods = list(dict.fromkeys(r["method"] for r in metrics["table"]))
    assert list(body) == methods, f"rendered rows {list(body)} != methods {methods}"
    protocol = evaluate.PROTOCOL_LABEL
    assert methods[:6] == ["langevin", f"langevin, {protocol}", "amortized", f"amortized, {protocol}", "GrabCut",
                           "all foreground"]
    assert methods[6].startswith("centred disc (best area ") and len(methods) == 7
    for r in metrics["table"]:
        cells = body[r["method"]]
        assert [t for t, _ in cells] == ["td", "td"] * len(splits)
        i = 2 * splits.index(r["split"])
        assert [c for _, c in cells[i:i + 2]] == [f"{r['iou']:.1f}", f"{r['dice']:.1f}"], r

    # Every image the page shows is there: inline PNGs that decode, or files next to the report.
    # The sample grid, the learning curves, the IoU histogram and the 12 worst cases.
    sizes = [_image_loads(src, report.parent) for src in dom.images]
    assert all(w >= 8 and h >= 8 for w, h in sizes), sizes
    assert len(dom.images) == 3 + 12, [src[:60] for src in dom.images]
