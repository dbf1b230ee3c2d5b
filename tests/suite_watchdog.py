"""A pytest plugin that ends a test stuck where pytest-timeout cannot reach it.

pytest-timeout's SIGALRM fails a test stuck in Python code, but a test stuck in C code (a collective,
a C++ client's wait) or in a tear-down after that failure holds the test process, and the whole
suite with it, forever: CI then only says it ran out of time. Past its limit plus a grace, the
watchdog writes where every thread was and which child processes were left to the real stderr,
kills those children and ends the process: under pytest-xdist the controller reports the test as
failed ("worker crashed while running ...") and runs the rest on a new worker; in one process (the
default) the run ends there, failed, instead of never. Loaded by tests/conftest.py; light on imports
so that a nested pytest (``-p suite_watchdog``) loads it too.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading

import psutil
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("watchdog_grace", "seconds past a test's pytest-timeout limit after which the watchdog ends a "
                  "test still running (set-up, call and tear-down together)", default="300")


def _timeout_of(item: pytest.Item) -> float:
    """The test's pytest-timeout limit in seconds, as pytest-timeout itself reads it (the test's mark, --timeout,
    PYTEST_TIMEOUT or the ini); 0: none, also where pytest-timeout is not installed (the GPU machine's pytest)."""
    if not item.config.pluginmanager.hasplugin("timeout"):
        return 0.0
    # pytest-timeout's own reading (private, but any other would drift from it: it missed PYTEST_TIMEOUT);
    # its hooks would not do: it cancels its timer, and theirs, as soon as a test fails, tear-down still to run
    from pytest_timeout import _get_item_settings

    return float(_get_item_settings(item).timeout or 0)


def _stuck(item: pytest.Item, after: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)  # stderr is the terminal's (or CI's log) again
    sys.stderr.write(f"\n+++ watchdog: {item.nodeid} still running {after:.0f} s after it started; its threads:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for child in psutil.Process().children(recursive=True):
        try:
            sys.stderr.write(f"+++ watchdog: killing child {child.pid} ({child.status()}): "
                             f"{' '.join(child.cmdline())[:300]}\n")
            child.kill()
        except psutil.Error:
            pass
    sys.stderr.flush()
    os._exit(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    limit = _timeout_of(item)
    if limit <= 0:
        return (yield)
    after = limit + float(item.config.getini("watchdog_grace"))
    watchdog = threading.Timer(after, _stuck, (item, after))
    watchdog.daemon = True
    watchdog.start()
    try:
        return (yield)
    finally:
        watchdog.cancel()
