"""The report: the figures of every stage gathered (:mod:`.summary`) and written as report.json, report.md
(:mod:`.markdown`) and report.html (:mod:`.html`)."""

from tledge.report.summary import write_report

__all__ = ["write_report"]
