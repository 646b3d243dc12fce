"""The report's interactive figures (rayunlearn/report/interactive.py) as data: which marks, error
bars, noise band, retention floor and hover text the plotly specs hold, checked against numbers
derived by hand from tests/fake_results.make_small_results. The page itself in a browser:
tests/test_report_browser.py."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from plotly.offline import get_plotlyjs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fake_results import SMALL_COMPLETED, make_small_results  # noqa: E402

from rayunlearn.io import write_json, write_parquet  # noqa: E402
from rayunlearn.report import ReportDataError, build_report  # noqa: E402
from rayunlearn.report.data import discover  # noqa: E402
from rayunlearn.report.figures import family_colors  # noqa: E402
from rayunlearn.report.interactive import TRIAL_ROLE, curves_plot, pareto_plot  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = make_small_results(tmp_path_factory.mktemp("small"))
    collections = discover(root)
    colors = family_colors(sorted({f for c in collections for f in c.trials["family"].astype(str)}))
    return root, {c.name: c for c in collections}, colors


def _trials(fig):
    return [t for t in fig.data if t.meta and t.meta.get("role") == TRIAL_ROLE]


def _named(fig, prefix):
    return [t for t in fig.data if t.name and t.name.startswith(prefix)]


def test_front_of_every_collection_with_its_extras(small):
    root, colls, colors = small
    fig = pareto_plot([colls["study"], colls["sweep"]], colors, "all")
    trials = _trials(fig)
    # one mark per completed trial; the stopped and failed trials are not drawn
    assert sum(len(t.x) for t in trials) == sum(SMALL_COMPLETED.values()) == 9
    by_name = {t.name: t for t in trials}
    assert sorted(by_name) == ["ga (study)", "ga+gd (study)", "npo (study)", "npo+kl (sweep)", "wga+kl (study)",
                               "wga+kl (sweep)"]
    # a family is one legend group across collections; a collection is one marker shape
    assert {t.legendgroup for t in trials} == {"ga", "ga+gd", "npo", "npo+kl", "wga+kl"}
    assert by_name["wga+kl (study)"].marker.symbol != by_name["wga+kl (sweep)"].marker.symbol
    # error bars from the seeds' standard deviations, where the table has them
    wga = by_name["wga+kl (sweep)"]
    np.testing.assert_allclose(wga.x, [0.8, 0.86, 0.9, 0.7])
    np.testing.assert_allclose(wga.error_x.array, [0.01, 0.02, 0.03, 0.04])
    np.testing.assert_allclose(wga.error_y.array, [0.005, 0.01, 0.015, 0.02])
    assert by_name["ga (study)"].error_x.array is None
    # the front over both collections: ga (0.95, 0.2) and sweep trials 0-2
    front = _named(fig, "Pareto front")[0]
    np.testing.assert_allclose(front.x, [0.8, 0.86, 0.9, 0.95])
    np.testing.assert_allclose(front.y, [0.56, 0.55, 0.5, 0.2])
    # the noise band: the front widened by ± (0.02, 0.01) — outer edge, corner, inner edge back
    band = _named(fig, "noise band")[0]
    assert band.fill == "toself"
    np.testing.assert_allclose(band.x, [0.78, 0.82, 0.88, 0.92, 0.97, 0.97, 0.93, 0.88, 0.84, 0.78, 0.78])
    np.testing.assert_allclose(band.y, [0.57, 0.57, 0.56, 0.51, 0.21, 0.19, 0.19, 0.49, 0.54, 0.55, 0.57])
    # the sweep's retention floor: 0.9 x the target's retention 0.6, across every mark and reference
    floor = _named(fig, "retention floor 0.9 × target")[0]
    np.testing.assert_allclose(floor.y, [0.54, 0.54])
    np.testing.assert_allclose(floor.x, [0.05, 0.95])
    # the references both collections share: drawn once each
    refs = {t.name: (t.x[0], t.y[0]) for t in fig.data if t.legendgroup == "references"}
    assert refs == {"target model": (0.05, 0.6), "retain model": (0.9, 0.58)}


def test_hover_names_method_hyper_parameters_and_metrics(small):
    root, colls, colors = small
    fig = pareto_plot([colls["sweep"]], colors, "sweep")
    wga = next(t for t in _trials(fig) if t.name == "wga+kl")
    hover = wga.hovertext[1]
    assert hover.startswith("<b>wga(alpha=1)+1*kl</b>")
    for part in ("sweep/trial-001 · wga+kl · Pareto front", "alpha = 1", "removal = 0.86 ± 0.02",
                 "retention = 0.55 ± 0.01", "feasible = True", "n_seeds = 3"):
        assert part in hover, (part, hover)
    assert "beta" not in hover        # not a hyper-parameter of this family
    assert "Pareto front" not in wga.hovertext[3]   # trial-003 (0.7, 0.4) is dominated


def test_front_without_extras_and_floor_without_target(tmp_path):
    write_parquet(tmp_path / "trials.parquet", pa.table({
        "trial_id": ["a", "b"], "family": ["ga", "npo"], "method": ["ga", "npo<&>"], "status": ["completed"] * 2,
        "removal": [0.9, 0.5], "retention": [0.1, 0.5]}))
    (tmp_path / "sweep.yaml").write_text("name: x\nretention_floor: 0.8\n")
    c = discover(tmp_path)[0]
    fig = pareto_plot([c], family_colors(["ga", "npo"]), "t")
    assert [t.name for t in fig.data] == ["ga", "npo", "Pareto front"]    # no band, no floor, no references
    assert all(t.error_x.array is None for t in _trials(fig))
    assert fig.data[1].hovertext[0].startswith("<b>npo&lt;&amp;&gt;</b>")   # method strings are escaped
    # the floor is a fraction of the target's retention: without the target it is said, not drawn
    assert [a.text for a in fig.layout.annotations] == [
        f"retention floor 0.8 × target ({c.name}): not drawn, the target model was not evaluated"]


@pytest.mark.parametrize("noise, message", [({"removal": "wide", "retention": 0.1}, "expected a number"),
                                            ({"removal": 0.1}, "'retention' must be a half-width >= 0, got None"),
                                            ({"removal": -0.1, "retention": 0.1}, "'removal' must be a half-width >= 0")])
def test_malformed_noise_file_is_a_clear_error(tmp_path, noise, message):
    write_parquet(tmp_path / "trials.parquet", pa.table({
        "trial_id": ["a"], "family": ["ga"], "method": ["ga"], "status": ["completed"], "removal": [0.9],
        "retention": [0.1]}))
    write_json(tmp_path / "reference" / "noise.json", noise)
    with pytest.raises(ReportDataError, match=re.escape(message)):
        discover(tmp_path)


def test_curves_one_line_per_trial_and_risk(small):
    root, colls, colors = small
    assert curves_plot(colls["study"], colors, "t") is None     # no steps.parquet in the study
    fig = curves_plot(colls["sweep"], colors, "t")
    lines = {(t.hovertext[0].split("</b>")[0][3:], t.xaxis): t for t in fig.data}
    assert sorted(lines) == [("npo(beta=0.2)+1*kl", "x"), ("npo(beta=0.2)+1*kl", "x2"),
                             ("wga(alpha=0.5)+1*kl", "x"), ("wga(alpha=0.5)+1*kl", "x2")]
    np.testing.assert_allclose(lines[("wga(alpha=0.5)+1*kl", "x")].y, [-1.0, -2.0, -3.0])      # removal
    np.testing.assert_allclose(lines[("npo(beta=0.2)+1*kl", "x2")].y, [0.05, -0.1, 0.025])    # retention
    np.testing.assert_allclose(lines[("npo(beta=0.2)+1*kl", "x")].x, [2, 4, 6])
    # one legend entry per family, which toggles both panels
    assert sorted(t.legendgroup for t in fig.data if t.showlegend) == ["npo+kl", "wga+kl"]


def test_report_embeds_plotly_once_and_keeps_the_pngs_for_markdown(small, tmp_path):
    root, _, _ = small
    html = build_report(root, tmp_path / "out").read_text(encoding="utf-8")
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert html.count(get_plotlyjs()) == 1
    outside_scripts = re.sub(r"<script\b.*?</script>", "", html, flags=re.S)
    assert "<script src" not in html and "src='http" not in outside_scripts and "href=" not in outside_scripts
    divs = re.findall(r"data-kind='(\w+)' data-name='(\w+)'", html)
    assert sorted(divs) == [("geffect_curves", "sweep"), ("pareto", "all"), ("pareto", "study"), ("pareto", "sweep")]
    for png in ("study_pareto.png", "sweep_pareto.png", "all_pareto.png", "sweep_geffect_curves.png"):
        assert f"](figures/{png})" in md
    assert "plotly" not in md.lower()
