"""Reports of a FeatureDiff: report.json, report.md, a self-contained report.html, PNG figures."""

from crossdiff.report.writer import report_data, write_report

__all__ = ["report_data", "write_report"]
