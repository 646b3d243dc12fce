"""report.html in a real browser: headless Chromium opens the page (no network), the interactive
plots render without a script error, each Pareto front draws one mark per completed trial, and a
hovered mark shows its trial's method string, hyper-parameters and metrics.

The page records its own script errors and the marks it drew (rayunlearn/report/interactive.py);
Chromium's DOM dump carries them back. Chromium is the Debian package (`apt-get install chromium`,
which .ci/run does when it is missing): under CI=true a missing browser fails these tests, elsewhere
they skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from plotly.offline import get_plotlyjs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fake_results import SMALL_COMPLETED, make_small_results  # noqa: E402

from rayunlearn.report import build_report  # noqa: E402
from rayunlearn.report.interactive import PLOT_CLASS  # noqa: E402

BROWSERS = ("chromium", "chromium-browser")
# the Pareto plots of the small results and their completed trials (fake_results.make_small_results)
EXPECTED_MARKS = {**SMALL_COMPLETED, "all": sum(SMALL_COMPLETED.values())}
# Appended to a copy of the page: once every plot is drawn, move the mouse onto the one mark of
# the sweep's npo+kl trace (trial-004) as a user would, and keep the hover label's text.
HOVER_PROBE = """<script>
(function wait() {
  var root = document.documentElement, plots = document.querySelectorAll('div.%s');
  if (root.getAttribute('data-plots-rendered') !== String(plots.length)) { setTimeout(wait, 50); return; }
  var gd = document.querySelector("div[data-kind='pareto'][data-name='sweep']");
  var mark = gd.querySelector('g.tracetrial0 path.point').getBoundingClientRect();
  gd.querySelector('.nsewdrag').dispatchEvent(new MouseEvent('mousemove', {bubbles: true,
    clientX: mark.left + mark.width / 2, clientY: mark.top + mark.height / 2}));
  setTimeout(function () {
    var label = gd.querySelector('.hoverlayer .hovertext');
    root.setAttribute('data-hover', label ? label.textContent : '');
  }, 200);
})();
</script>""" % PLOT_CLASS


def chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI") == "true":
        pytest.fail(f"none of {BROWSERS} is on PATH under CI: .ci/run installs the Debian package "
                    "(apt-get install -y chromium); the report's browser test must run in CI")
    pytest.skip(f"no Chromium here (none of {BROWSERS} on PATH): `apt-get install chromium` to run the "
                "report's browser test (CI installs it)")


class RenderedPage(HTMLParser):
    """The attributes of ``<html>`` and of every plot div of a DOM dump."""

    def __init__(self, dom: str):
        super().__init__()
        self.root: dict[str, str | None] = {}
        self.plots: list[dict[str, str | None]] = []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "html":
            self.root = a
        elif tag == "div" and PLOT_CLASS in (a.get("class") or "").split():
            self.plots.append(a)


def render(page: Path, scratch: Path) -> RenderedPage:
    """Open ``page`` in headless Chromium and return its DOM after the scripts ran (virtual time
    lets timers and promises finish before the dump)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-extensions", f"--user-data-dir={scratch / 'profile'}", "--virtual-time-budget=30000",
           "--dump-dom", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "<html" in proc.stdout, \
        f"chromium exited {proc.returncode}: {proc.stderr[-2000:]}"
    return RenderedPage(proc.stdout)


def problems(page: RenderedPage) -> list[str]:
    """What is wrong with a rendered report: script errors, plots left undrawn, Pareto plots whose
    trial marks are not one per completed trial."""
    out = []
    errors = page.root.get("data-script-errors")
    if errors is None:
        out.append("the page's error recorder did not run")
    elif json.loads(errors):
        out.append(f"script errors: {json.loads(errors)}")
    if page.root.get("data-plots-rendered") != str(len(page.plots)):
        out.append(f"{page.root.get('data-plots-rendered')} of {len(page.plots)} plots rendered")
    marks = {p["data-name"]: p.get("data-marks") for p in page.plots if p["data-kind"] == "pareto"}
    if marks != {k: str(v) for k, v in EXPECTED_MARKS.items()}:
        out.append(f"Pareto marks {marks}, expected one per completed trial {EXPECTED_MARKS}")
    return out


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    chromium()   # skip (or fail under CI) before building anything
    return build_report(make_small_results(tmp_path_factory.mktemp("results")))


def test_report_renders_one_mark_per_completed_trial(report, tmp_path):
    page = render(report, tmp_path)
    assert problems(page) == []
    kinds = sorted((p["data-kind"], p["data-name"]) for p in page.plots)
    assert kinds == [("geffect_curves", "sweep"), ("pareto", "all"), ("pareto", "study"), ("pareto", "sweep")]


def test_hover_shows_method_hyper_parameters_and_metrics(report, tmp_path):
    probed = tmp_path / "report.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", HOVER_PROBE + "</body>"),
                      encoding="utf-8")
    page = render(probed, tmp_path)
    assert problems(page) == []
    hover = page.root.get("data-hover") or ""
    for part in ("npo(beta=0.2)+1*kl", "sweep/trial-004", "beta = 0.2", "removal = 0.75 ± 0.03",
                 "retention = 0.52 ± 0.02", "n_seeds = 3"):
        assert part in hover, (part, hover)


@pytest.mark.parametrize("breakage, expected", [
    ("plotly.js cut short", "script errors"),
    ("renderer calls a missing function", "script errors"),
    ("a trial trace not counted", "Pareto marks"),
])
def test_a_broken_page_fails_the_check(report, tmp_path, breakage, expected):
    """The check above is not vacuous: each breakage of the page makes it report a problem."""
    html = report.read_text(encoding="utf-8")
    if breakage == "plotly.js cut short":
        js = get_plotlyjs()
        broken = html.replace(js, js[: len(js) // 2])
    elif breakage == "renderer calls a missing function":
        broken = html.replace("Plotly.newPlot(div", "Plotly.newPlott(div")
    else:   # the first trial trace's role renamed: drawn, but not counted as a trial's marks
        broken = html.replace('"role": "trial"', '"role": "other"', 1)
    assert broken != html
    page_path = tmp_path / "broken.html"
    page_path.write_text(broken, encoding="utf-8")
    found = problems(render(page_path, tmp_path))
    assert any(p.startswith(expected) for p in found), found
