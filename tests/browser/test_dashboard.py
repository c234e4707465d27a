"""The Voilà dashboard (notebooks/dashboard.ipynb) in headless Chromium at 1280x800.

It opens with the shipped grid drawn, no code, no error and no stray text; its controls fit the
screen in readable type; a control change and Run train one point and redraw the plot in place.
"""

from __future__ import annotations

import re
import time

import pytest
from pages import (
    FAST_STEPS,
    Explorer,
    PlaywrightTimeoutError,
    expect,
    find_errors,
    font_sizes,
    layout_problems,
    open_dashboard_at,
    stray_reprs,
    train_one_point,
)

pytestmark = pytest.mark.browser

MIN_FONT_PX = 14  # readable on a projector from the back of a room


def open_dashboard(page, server) -> tuple[Explorer, float]:
    start = time.perf_counter()
    explorer = open_dashboard_at(page, f"{server.url}/?token={server.token}")
    return explorer, time.perf_counter() - start


def test_dashboard_opens_ready_and_fits_the_screen(voila_server, page, shots, timings):
    explorer, seconds = open_dashboard(page, voila_server)
    timings("Voila: first load (runs the notebook)", seconds)
    page.screenshot(path=shots / "voila-dashboard.png")
    explorer.check_structure()

    text = page.locator("body").inner_text()
    assert "LoRA Lab" in text
    assert not find_errors(page), find_errors(page)
    assert not stray_reprs(text), stray_reprs(text)
    code = page.locator(".jp-CodeCell .jp-InputArea, .jp-CodeMirrorEditor, .cm-editor")
    assert code.locator("visible=true").count() == 0, "code is showing"

    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    problems = layout_problems(explorer.root, vw)
    assert not problems, problems
    assert page.evaluate("document.documentElement.scrollWidth") <= vw, "horizontal scrolling"
    # Everything a presenter needs is on screen without scrolling: controls, Run, status, plot.
    for what in (explorer.run, explorer.status, explorer.visible_image, explorer.lists.nth(3)):
        box = what.bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= vh, (what, box)
    sizes = font_sizes(explorer.root)
    assert all(size >= MIN_FONT_PX for size in sizes.values()), sizes

    for title in ("Memory", "Loss", "Accuracy", "Dropout", "Parameters"):
        explorer.open_tab(title)
        expect(explorer.visible_image).to_have_attribute("src", re.compile(r"^blob:"))
    page.screenshot(path=shots / "voila-dashboard-tabs.png")
    assert not find_errors(page)


def test_dashboard_run_trains_one_point_and_redraws(voila_server, page, shots, timings):
    explorer, _ = open_dashboard(page, voila_server)
    seconds = train_one_point(explorer, shots, "voila-dashboard")
    timings("Voila: set the explorer's controls", seconds["controls"])
    timings(f"Voila: Run (1 point, {FAST_STEPS} steps)", seconds["run"])
    assert not find_errors(page)
    problems = layout_problems(explorer.root, page.viewport_size["width"])
    assert not problems, problems  # the longer status line still fits
    text = page.locator("body").inner_text()
    assert not stray_reprs(text), stray_reprs(text)  # no placeholder left by the progress bars


# Whether an element's text can be read whole at this screen: it lies inside the viewport, and
# either all its text fits its box or the box scrolls (overflow auto or scroll) in that direction.
READABLE = """el => {
  const r = el.getBoundingClientRect(), cs = getComputedStyle(el);
  const scrolls = v => v === 'auto' || v === 'scroll';
  const inner = el.querySelector('.widget-html-content') || el;
  return {
    top: r.top, bottom: r.bottom, left: r.left, right: r.right,
    fitsY: el.scrollHeight <= el.clientHeight + 1 || scrolls(cs.overflowY),
    fitsX: el.scrollWidth <= el.clientWidth + 1 || scrolls(cs.overflowX),
    innerFitsX: inner.scrollWidth <= inner.clientWidth + 1,
  };
}"""


def assert_readable(locator, viewport: dict, what: str) -> None:
    facts = locator.evaluate(READABLE)
    assert facts["top"] >= 0 and facts["bottom"] <= viewport["height"], (what, facts)
    assert facts["left"] >= 0 and facts["right"] <= viewport["width"], (what, facts)
    assert facts["fitsY"] and facts["fitsX"] and facts["innerFitsX"], (what, facts)


def test_the_status_and_progress_lines_are_whole_or_scroll_at_1280x800(voila_server, page, shots):
    """A long status line (runs cached at another lr) and the progress lines of a run stay on
    the screen, and what does not fit their box scrolls inside it instead of being cut off."""
    explorer, _ = open_dashboard(page, voila_server)
    viewport = page.viewport_size
    assert (viewport["width"], viewport["height"]) == (1280, 800)
    lr = explorer.root.locator("select:not([multiple])").filter(has_text="0.0025")
    lr.select_option(label="0.01")  # nothing of the 600-step grid at 0.01: the longest status
    expect(explorer.status).to_contain_text("cached LoRA runs at lr 0.01", timeout=60_000)
    page.screenshot(path=shots / "voila-dashboard-long-status.png")
    assert_readable(explorer.status, viewport, "status")

    explorer.open_tab("Loss")
    explorer.choose_one_fast_point()
    explorer.run.click()
    log = explorer.root.locator(".widget-output").first
    bar = explorer.root.locator(".widget-output .widget-hprogress")
    try:
        bar.first.wait_for(timeout=30_000)
        page.screenshot(path=shots / "voila-dashboard-progress.png")
        assert_readable(log, viewport, "progress lines")
    except PlaywrightTimeoutError:  # the run ended before a bar was drawn: nothing to see
        pass
    expect(explorer.status).to_contain_text("last run trained 1 point", timeout=240_000)
    assert_readable(explorer.status, viewport, "status after the run")
    assert not find_errors(page)
