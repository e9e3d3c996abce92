"""Reports shared by every stage: PNG plots (matplotlib, Agg), markdown, and one HTML file with the
PNGs embedded, so a report is a single file to send around. `smoltrain report RUN_DIR` renders a run.
"""

from smoltrain.report.run import report_run  # noqa: E402  (the library function behind `smoltrain report`)

__all__ = ["report_run"]
