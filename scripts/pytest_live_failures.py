"""pytest plugin (`-p scripts.pytest_live_failures`): print each failure with its message as it
happens, so a run stopped by a time limit (scripts/gpu_check.sh) still says what failed and why.
"""
import sys


def pytest_runtest_logreport(report):
    if report.failed:
        text = report.longreprtext
        sys.__stdout__.write(f"\nLIVE FAILED {report.nodeid} ({report.when})\n{text[-1500:]}\n")
        sys.__stdout__.flush()
