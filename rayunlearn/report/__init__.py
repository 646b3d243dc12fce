"""Pareto frontier and G-effect reports from a results directory (files only: no Ray, no
model). `build_report(results_dir, out_dir=None) -> Path` writes a self-contained report.html,
report.md, figures/*.png and summary.json; `report_command` is the CLI entry."""

from rayunlearn.report.build import build_report, report_command
from rayunlearn.report.data import ReportDataError
from rayunlearn.report.findings import Finding, check_claims

__all__ = ["build_report", "report_command", "ReportDataError", "Finding", "check_claims"]
