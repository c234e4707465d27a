"""Fixtures for the browser tests: Chromium through Playwright, JupyterLab and Voilà servers.

The tests need Playwright's Python package and a Chromium binary (Debian's /usr/bin/chromium;
Playwright's own browser downloads are never used). Outside CI, when either is missing, the
tests skip and say how to install it; with CI=true they fail instead.

Screenshots (after every notebook run, and of the page whenever a test fails) and a timings table
go to test-artifacts/browser/.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from needs import browser_missing, find_chromium, skip_or_fail
from servers import NOTEBOOKS, ROOT, start_lab, start_voila

ARTIFACTS = ROOT / "test-artifacts" / "browser"
VIEWPORT = {"width": 1280, "height": 800}  # a projector / small laptop screen
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
_TIMINGS: dict[str, float] = {}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium binary; skips (fails in CI) when it or Playwright is missing."""
    missing = browser_missing()
    if missing:
        skip_or_fail("browser tests need " + "; and ".join(missing))
    return find_chromium()


@pytest.fixture(scope="session")
def shots() -> Path:
    """test-artifacts/browser/, emptied once per test session."""
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def timings():
    """Record a named duration (seconds); printed at the end and kept in timings.json."""

    def record(name: str, seconds: float) -> None:
        _TIMINGS[name] = round(seconds, 1)

    return record


def launch_chromium(pw, chromium: str, profile: Path, home: Path):
    """A headless Chromium context (1280x800) with its own profile folder and HOME."""
    context = pw.chromium.launch_persistent_context(
        str(profile),
        executable_path=chromium,
        headless=True,
        args=CHROMIUM_FLAGS,
        viewport=VIEWPORT,
        device_scale_factor=1,
        env={**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
             "XDG_CACHE_HOME": str(home / ".cache")},
        timeout=60_000,
    )  # fmt: skip
    context.set_default_timeout(60_000)
    return context


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory, timings):
    """A headless Chromium (persistent context, temp profile) with a 1280x800 viewport."""
    from playwright.sync_api import sync_playwright

    base = tmp_path_factory.mktemp("chromium")
    home = base / "home"
    home.mkdir()
    start = time.perf_counter()
    pw = sync_playwright().start()
    context = None
    try:
        context = launch_chromium(pw, chromium, base / "profile", home)
        timings("start Chromium", time.perf_counter() - start)
        yield context
    finally:
        try:
            if context is not None:
                context.close()
        finally:
            pw.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def page(browser, request, shots):
    """A fresh tab; on failure its screenshot is saved as FAILED-<test>.png."""
    tab = browser.new_page()
    messages: list[str] = []
    tab.on("pageerror", lambda exc: messages.append(f"page error: {exc}"))
    tab.page_errors = messages  # JavaScript exceptions, for the tests to report
    try:
        yield tab
    finally:
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            name = request.node.name.replace("/", "_").replace("[", "-").rstrip("]")
            try:
                tab.screenshot(path=shots / f"FAILED-{name}.png", timeout=15_000)
            except Exception as exc:  # the page may be gone; the failure matters more
                print(f"(no failure screenshot: {exc})")
        tab.close()


@pytest.fixture(scope="module")
def lab_server(chromium, tmp_path_factory, timings):
    """JupyterLab on 127.0.0.1 over copies of the walkthrough notebooks; stopped by PID."""
    base = tmp_path_factory.mktemp("jupyterlab")
    server = start_lab(base, sorted(NOTEBOOKS.glob("0*.ipynb")))
    timings("start JupyterLab", server.started_seconds)
    try:
        yield server
    finally:
        server.shutdown_sessions()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def voila_server(chromium, tmp_path_factory, timings):
    """Voilà serving notebooks/dashboard.ipynb on 127.0.0.1; stopped by PID."""
    base = tmp_path_factory.mktemp("voila")
    server = start_voila(base, NOTEBOOKS / "dashboard.ipynb")
    timings("start Voila", server.started_seconds)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def configurable_http_proxy() -> str:
    """JupyterHub's proxy (configurable-http-proxy, from npm) on the PATH; skips (fails in CI)
    when it is missing."""
    from hub import PROXY_HINT, find_proxy

    path = find_proxy()
    if path is None:
        message = f"the JupyterHub tests need {PROXY_HINT}"
        if in_ci():
            pytest.fail(f"CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def new_chromium(chromium, tmp_path_factory, timings):
    """A factory of separate headless Chromiums, each with its own profile, cookies and HOME:
    one per person a test plays (two students logged in to one JupyterHub). `new_chromium(name)`
    returns a 1280x800 context; all are closed at the end of the module.

    Not to be combined with the `browser` fixture in one module: each starts Playwright, and
    Playwright's sync API runs one instance per thread.
    """
    from playwright.sync_api import sync_playwright

    base = tmp_path_factory.mktemp("chromiums")
    pw = sync_playwright().start()
    contexts = []

    def launch(name: str):
        home = base / name / "home"
        home.mkdir(parents=True)
        start = time.perf_counter()
        context = launch_chromium(pw, chromium, base / name / "profile", home)
        contexts.append(context)
        timings(f"start Chromium ({name})", time.perf_counter() - start)
        return context

    try:
        yield launch
    finally:
        try:
            for context in contexts:
                try:
                    context.close()
                except Exception as exc:  # one that will not close must not keep the others open
                    print(f"(Chromium context did not close: {exc})")
        finally:
            pw.stop()
            shutil.rmtree(base, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can see a failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def pytest_terminal_summary(terminalreporter):
    if not _TIMINGS:
        return
    terminalreporter.section("browser test timings (s)")
    for name, seconds in _TIMINGS.items():
        terminalreporter.write_line(f"{seconds:7.1f}  {name}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "timings.json").write_text(json.dumps(_TIMINGS, indent=1) + "\n")
