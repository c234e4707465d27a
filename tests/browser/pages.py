"""What the browser tests do in a page: run a notebook in JupyterLab, read its outputs for
errors, drive the sweep explorer (in JupyterLab or Voilà), and check a widget tree's layout.

JupyterLab 4 renders an error output and a stderr stream the same way: both become an
`.jp-OutputArea-output` with `data-mime-type="application/vnd.jupyter.stderr"` (an error's bundle
also holds `application/vnd.jupyter.error`, which has no renderer). tqdm's progress bars and
warnings are stderr too, so an error is told apart by its text: IPython's traceback header
("Traceback (most recent call last)"), a SyntaxError's "Cell In[N], line M", or a line that
starts with an exception name and a colon ("ValueError: ...").
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect
except ImportError:  # no Playwright: conftest's `chromium` fixture skips (or, in CI, fails)
    expect = None
    PlaywrightTimeoutError = TimeoutError

from lab.widgets import PLOTS  # the explorer's plot tabs, one per entry

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

# -- reading a page ---------------------------------------------------------------------------

ERROR_PATTERN = (
    r"Traceback \(most recent call last\)"
    r"|^\s*Cell In\[\d+\], line \d+"
    r"|^\s*(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]*(?:Error|Exception|Interrupt)(?::|$)"
)

FIND_ERRORS_JS = """
([root, pattern]) => {
  const errorRe = new RegExp(pattern, "m");
  const found = [];
  const outputs = root.querySelectorAll(
    ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'],"
    + " [data-mime-type='application/vnd.jupyter.error']"
  );
  for (const el of outputs) {
    const text = el.textContent || "";
    if (errorRe.test(text)) found.push(text.slice(0, 1500));
  }
  const text = root.innerText || "";
  for (const phrase of ["Error displaying widget", "There was an error when executing cell"]) {
    if (text.includes(phrase)) found.push(phrase);
  }
  return found;
}
"""

# Text that means something was printed as a repr instead of being drawn or rendered.
STRAY_REPR = re.compile(
    r"\b(?:VBox|HBox|Box|Tab|GridBox|Output|Image)\(children=|<Figure size \d+x\d+|"
    r"<ipywidgets\.|<IPython\.core\.display\.|Error displaying widget|Loading widget\.\.\."
)


def find_errors(page: Page, root: str = "body") -> list[str]:
    """Error outputs (not stderr progress bars or warnings) under `root`."""
    return page.locator(root).first.evaluate(
        "(el, pattern) => (" + FIND_ERRORS_JS + ")([el, pattern])", ERROR_PATTERN
    )


def stray_reprs(text: str) -> list[str]:
    return sorted({m.group(0) for m in STRAY_REPR.finditer(text)})


# -- JupyterLab -------------------------------------------------------------------------------

PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
INDICATOR = f"{PANEL} .jp-Notebook-ExecutionIndicator"
# A widget output has no data-mime-type: the root widget's view sits right in the output.
WIDGET_OUTPUT = (
    ".jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output > .jupyter-widgets"
)

RUN_STATE_JS = """
() => {
  const panel = document.querySelector(".jp-NotebookPanel:not(.lm-mod-hidden)");
  if (!panel) return "no notebook";
  const indicator = panel.querySelector(".jp-Notebook-ExecutionIndicator");
  const prompts = [...panel.querySelectorAll(".jp-CodeCell .jp-InputArea-prompt")]
    .map((p) => p.textContent.trim());
  if (prompts.some((t) => t.includes("*"))) { window.__loraBusySeen = true; return "running"; }
  if (!window.__loraBusySeen) return "not started";
  if (!indicator || indicator.dataset.status !== "idle") return "kernel busy";
  return "idle";
}
"""

WATCH_BUSY_JS = """
() => {
  // A queued or running cell's prompt reads [*]: watch every change of a prompt, so that even
  // a cell that runs between two polls is seen (kernel busy states alone are not enough: the
  // widget manager's own messages make the kernel busy too).
  window.__loraBusySeen = false;
  const panel = document.querySelector(".jp-NotebookPanel:not(.lm-mod-hidden)");
  window.__loraBusyObserver?.disconnect();
  window.__loraBusyObserver = new MutationObserver((mutations) => {
    for (const m of mutations) {
      const node = m.target.nodeType === 1 ? m.target : m.target.parentElement;
      const prompt = node && node.closest(".jp-InputArea-prompt");
      if (prompt && prompt.textContent.includes("*")) window.__loraBusySeen = true;
    }
  });
  window.__loraBusyObserver.observe(panel, { subtree: true, childList: true, characterData: true });
}
"""


# The toolbar's indicator says "idle" before the kernel has even started (then "connecting",
# "unknown", "idle"); the status bar names the kernel only once it is connected. A Run All sent
# before that is silently dropped, so both must say idle.
KERNEL_READY_JS = """
() => {
  const indicator = document.querySelector(
    ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator");
  const bar = [...document.querySelectorAll(".jp-StatusBar-Widget")]
    .map((e) => e.innerText).join("\\n");
  return !!indicator && indicator.dataset.status === "idle"
    && /^(?!No Kernel).+ \\| Idle$/m.test(bar);
}
"""


def open_notebook(page: Page, server, relpath: str, timeout_ms: int = 120_000) -> None:
    """Open `relpath` in a fresh JupyterLab workspace; return once its kernel is connected and
    idle."""
    page.goto(f"{server.url}/lab/tree/{relpath}?reset&token={server.token}")
    expect(page.locator(f"{PANEL} .jp-Cell").first).to_be_visible(timeout=timeout_ms)
    page.wait_for_function(KERNEL_READY_JS, timeout=timeout_ms, polling=250)


def run_all_cells(page: Page, timeout_ms: int = 600_000) -> float:
    """Run menu -> Run All Cells; wait until the kernel was busy, nothing is queued and it is
    idle again. Returns the seconds it took."""
    page.evaluate(WATCH_BUSY_JS)
    page.locator(f"{PANEL} .jp-Cell").first.click()  # focus the notebook (command mode)
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    start = time.perf_counter()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(f"() => ({RUN_STATE_JS})() === 'idle'", timeout=timeout_ms,
                           polling=250)  # fmt: skip
    return time.perf_counter() - start


def execution_counts(page: Page) -> list[str]:
    """Each code cell's input prompt, e.g. '[3]:' (or '[ ]:' for a cell that never ran)."""
    prompts = page.locator(f"{PANEL} .jp-CodeCell .jp-InputArea-prompt")
    return [t.strip() for t in prompts.all_inner_texts()]


def stray_outputs(page: Page) -> list[str]:
    """Plain-text outputs that are a repr of a widget or figure (not drawn)."""
    texts = page.locator(
        f"{PANEL} .jp-OutputArea-output[data-mime-type='text/plain']"
    ).all_inner_texts()
    return stray_reprs("\n".join(texts))


def screenshot_widgets(page: Page, shots: Path, stem: str) -> list[Path]:
    """Scroll each widget output into view and take a 1280x800 screenshot of it."""
    paths = []
    widgets = page.locator(f"{PANEL} {WIDGET_OUTPUT}")
    for i in range(widgets.count()):
        widgets.nth(i).evaluate("e => e.scrollIntoView({block: 'start'})")
        path = shots / f"{stem}-widget{i + 1}.png"
        page.screenshot(path=path)
        paths.append(path)
    return paths


# -- the sweep explorer (same widgets in notebook 05 and in the dashboard) --------------------

FAST_STEPS = 60  # one point of this many steps trains in seconds on a 2-core CPU

IMAGE_DIGEST_JS = """
async (img) => {
  if (!img.src) return "";
  try {
    const bytes = await (await fetch(img.src)).arrayBuffer();
    const hash = await crypto.subtle.digest("SHA-256", bytes);
    return [...new Uint8Array(hash)].map((b) => b.toString(16).padStart(2, "0")).join("");
  } catch (e) {
    return "unreadable:" + img.src;  // a revoked blob: the image was replaced meanwhile
  }
}
"""


def image_digest(img: Locator) -> str:
    """SHA-256 of the PNG an <img> shows (read from its blob URL)."""
    return img.evaluate(IMAGE_DIGEST_JS)


def stable_digest(img: Locator, quiet_s: float = 1.5, timeout_s: float = 60.0) -> str:
    """The image's digest once it has stopped changing for `quiet_s` (redraws have landed)."""
    deadline = time.monotonic() + timeout_s
    last, since = image_digest(img), time.monotonic()
    while time.monotonic() < deadline:
        img.page.wait_for_timeout(250)
        now = image_digest(img)
        if now != last or not now or now.startswith("unreadable"):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return now
    raise AssertionError(f"the plot kept changing for {timeout_s:.0f} s")


class Explorer:
    """Locators for the sweep explorer's widgets under `root`."""

    RANKS = ["1", "2", "4", "8", "16", "32", "64"]
    ALPHAS = ["2", "4", "8", "16", "32", "64"]
    DROPOUTS = ["0", "0.05", "0.1", "0.2", "0.3", "0.5"]
    TARGETS = ["q", "k", "v", "o", "up", "down"]

    def __init__(self, root: Locator) -> None:
        self.root = root
        self.page = root.page
        self.status = root.locator(".widget-html").filter(
            has_text=re.compile(r"selected|select at")
        )
        self.lists = root.locator("select[multiple]")
        self.slider = root.locator(".widget-slider").filter(has_text="steps")
        self.full = root.locator(".widget-checkbox input[type='checkbox']")
        self.run = root.locator("button.widget-button").filter(has_text=re.compile(r"^\s*Run\s*$"))
        self.tabs = root.locator(".lm-TabBar-tab")
        self.visible_image = root.locator("img.widget-image:visible")

    def check_structure(self) -> None:
        """The four lists are rank, alpha, dropout, targets, in that order."""
        expect(self.lists).to_have_count(4)
        options = [
            [o.strip() for o in self.lists.nth(i).locator("option").all_inner_texts()]
            for i in range(4)
        ]
        assert options == [self.RANKS, self.ALPHAS, self.DROPOUTS, self.TARGETS], options
        expect(self.status).to_have_count(1)
        expect(self.slider).to_have_count(1)
        expect(self.run).to_have_count(1)
        expect(self.tabs).to_have_count(len(PLOTS))

    def open_tab(self, title: str) -> None:
        self.tabs.filter(has_text=re.compile(rf"^\s*{title}")).click()
        expect(self.tabs.filter(has_text=re.compile(rf"^\s*{title}"))).to_have_class(
            re.compile(r"lm-mod-current")
        )

    def choose_one_fast_point(self, steps: int = FAST_STEPS) -> None:
        """Rank 1, alpha 16, dropout 0, no full fine-tuning, and few steps (the minimum, 20,
        then arrow keys: 60 steps leave a visible loss curve after the 20-step smoothing)."""
        self.lists.nth(0).select_option(label=["1"])
        self.lists.nth(1).select_option(label=["16"])
        self.lists.nth(2).select_option(label=["0"])
        self.full.uncheck()
        handle = self.slider.locator(".noUi-handle")
        handle.focus()
        handle.press("Home")  # noUiSlider: Home jumps to the minimum
        expect(self.slider.locator(".widget-readout")).to_have_text("20")
        for _ in range((steps - 20) // 20):
            handle.press("ArrowRight")  # one step of the slider: 20 training steps
        expect(self.slider.locator(".widget-readout")).to_have_text(str(steps))


RUN_DONE = re.compile(r"1 point selected, 1 cached, 0 to train\. last run trained 1 point in \d+ s")


def train_one_point(
    explorer: Explorer, shots: Path, prefix: str, tab_labels: bool = True, still: bool = True
) -> dict:
    """Choose one fast point, press Run, and check what a user would see.

    Before Run the status says the point is not cached; after it, that it is, and the loss plot
    shows other bytes in the same <img> at the same size (updated in place: no flicker, nothing
    moves). Screenshots before, during (if the progress bar is caught) and after. Returns the
    seconds taken to set the controls and to run, and "moved": how far the plot moved down.
    still=False allows the plot to move (not to resize).
    """
    page = explorer.page
    start = time.perf_counter()
    explorer.open_tab("Loss")
    explorer.choose_one_fast_point()
    expect(explorer.status).to_contain_text("1 point selected, 0 cached, 1 to train")
    image = explorer.visible_image
    before = stable_digest(image)
    image.evaluate("img => { img.dataset.loraProbe = 'before-run'; }")
    box = image.bounding_box()
    page.screenshot(path=shots / f"{prefix}-before-run.png")
    controls = time.perf_counter() - start

    start = time.perf_counter()
    explorer.run.click()
    during = []
    bar = explorer.root.locator(".widget-output .widget-hprogress")
    try:
        bar.first.wait_for(timeout=30_000)
        page.screenshot(path=shots / f"{prefix}-during-run.png")
        during = layout_problems(explorer.root, page.viewport_size["width"], tab_labels)
    except PlaywrightTimeoutError:  # the run ended before a bar was drawn: nothing to see
        pass
    expect(explorer.status).to_contain_text(RUN_DONE, timeout=240_000)
    run = time.perf_counter() - start
    after = stable_digest(image)
    page.screenshot(path=shots / f"{prefix}-after-run.png")

    assert after != before, "the loss plot did not change after Run"
    assert image.evaluate("img => img.dataset.loraProbe") == "before-run", "<img> replaced"
    now = image.bounding_box()
    assert (now["width"], now["height"]) == (box["width"], box["height"]), (box, now)
    assert not still or now == box, f"the plot moved: {box} -> {now}"
    assert "error" not in explorer.status.inner_text().lower()
    assert not during, f"layout while training: {during}"
    return {"controls": controls, "run": run, "moved": now["y"] - box["y"]}


def layout_problems(root: Locator, viewport_width: int, tab_labels: bool = True) -> list[str]:
    """Controls that overflow their box, text cut off, or anything past the viewport's edge
    (tab_labels=False: a tab title shortened with an ellipsis is not counted)."""
    return root.evaluate(
        """
(root, [vw, tabLabels]) => {
  const problems = [];
  const describe = (el) => (el.className || el.tagName).toString().slice(0, 60)
    + ` "${(el.innerText || el.value || "").trim().slice(0, 30)}"`;
  const box = root.getBoundingClientRect();
  if (box.right > vw + 1) problems.push(`the widget ends at x=${box.right}, past ${vw}`);
  const selector = ".widget-inline-hbox, .widget-box, .widget-button, .widget-toggle-button,"
    + " .widget-html-content, .widget-label, .widget-readout, select, .lm-TabBar-tabLabel,"
    + " img.widget-image, .widget-checkbox";
  const skip = tabLabels ? null : ".lm-TabBar-tabLabel";
  for (const el of root.querySelectorAll(selector)) {
    if (!el.offsetParent) continue;  // hidden (another tab, a closed panel)
    if (skip && el.matches(skip)) continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0 && r.height === 0) continue;
    if (el.scrollWidth > el.clientWidth + 2 && getComputedStyle(el).overflowX !== "auto")
      problems.push(`content wider than its box (${el.scrollWidth} > ${el.clientWidth}): `
                    + describe(el));
    if (r.right > box.right + 1 || r.left < box.left - 1)
      problems.push(`outside the widget (x ${r.left}..${r.right}): ` + describe(el));
  }
  return problems;
}
""",
        [viewport_width, tab_labels],
    )


def font_sizes(root: Locator) -> dict[str, float]:
    """Computed font sizes (px) of the explorer's text: lists, labels, status, buttons, tabs."""
    return root.evaluate(
        """
(root) => {
  const size = (sel) => {
    const el = root.querySelector(sel);
    return el ? parseFloat(getComputedStyle(el).fontSize) : 0;
  };
  return {
    list: size("select"),
    label: size(".widget-html-content b") || size(".widget-html-content"),
    description: size(".widget-label"),
    button: size(".widget-button"),
    tab: size(".lm-TabBar-tabLabel"),
    readout: size(".widget-readout"),
  };
}
"""
    )


# -- JupyterHub: a student's JupyterLab behind the hub's login ---------------------------------

try:
    from playwright.sync_api import Error as PlaywrightError
except ImportError:  # no Playwright: the tests skip (or, in CI, fail) before using it
    PlaywrightError = Exception

LAB_SHELL = "#jp-main-dock-panel"


def hub_login(page: Page, hub_url: str, name: str, password: str) -> None:
    """Fill in and submit the hub's login page, as a student does."""
    page.goto(f"{hub_url}/hub/login")
    page.locator("#username_input").fill(name)
    page.locator("#password_input").fill(password)
    page.locator("#login_submit").click()


def lab_is_up(page: Page, lab_url: str) -> bool:
    """True once the page shows JupyterLab served under `lab_url` (e.g. HUB/user/NAME).

    Asks the page itself: Playwright's page.url is a cached value that is only brought up to
    date while some call into the browser runs."""
    try:
        href = page.evaluate("() => location.href")
        return href.startswith(f"{lab_url}/lab") and page.locator(LAB_SHELL).is_visible()
    except PlaywrightError:  # the page is navigating (the hub's spawn and login redirects)
        return False


def open_notebook_at(page: Page, lab_url: str, relpath: str, timeout_ms: int = 180_000) -> None:
    """open_notebook for a JupyterLab the browser is logged in to (a hub's cookie, no token)."""
    goto_notebook_at(page, lab_url, relpath)
    wait_for_notebook(page, timeout_ms)


def goto_notebook_at(page: Page, lab_url: str, relpath: str) -> None:
    """Load `relpath` in a fresh JupyterLab workspace under `lab_url`; wait_for_notebook then
    waits for it (several students' pages load at once in between)."""
    page.goto(f"{lab_url}/lab/tree/{relpath}?reset")


def wait_for_notebook(page: Page, timeout_ms: int = 180_000) -> None:
    """Until the notebook opened by goto_notebook_at shows its cells and its kernel is idle."""
    expect(page.locator(f"{PANEL} .jp-Cell").first).to_be_visible(timeout=timeout_ms)
    page.wait_for_function(KERNEL_READY_JS, timeout=timeout_ms, polling=250)


def start_run_all(page: Page) -> float:
    """Run menu -> Run All Cells, without waiting; returns the perf_counter() of the click.
    run_state(page) says when it is done."""
    page.evaluate(WATCH_BUSY_JS)
    page.locator(f"{PANEL} .jp-Cell").first.click()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    return time.perf_counter()


def run_state(page: Page) -> str:
    """'not started', 'running', 'kernel busy' or 'idle' (every cell run) since start_run_all."""
    return page.evaluate(RUN_STATE_JS)


def until_all(conditions: dict, timeout_s: float, poll_s: float = 0.25) -> dict[str, float]:
    """Poll each named condition (a function returning a bool) in turn until every one has held
    once; returns the perf_counter() at which each first held. Several pages or browsers are
    waited for together, so each one's time is its own."""
    done: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while len(done) < len(conditions):
        for name, holds in conditions.items():
            if name not in done and holds():
                done[name] = time.perf_counter()
        if len(done) == len(conditions):
            break
        if time.monotonic() > deadline:
            waiting = sorted(set(conditions) - set(done))
            raise AssertionError(f"still waiting after {timeout_s:.0f} s for: {waiting}")
        time.sleep(poll_s)
    return done


def effective_colours(el: Locator) -> dict[str, list[float]]:
    """The element's text colour and the first opaque background behind it (RGB, 0-255)."""
    return el.evaluate(
        """
(el) => {
  const rgb = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  let node = el, bg = null;
  while (node && node.nodeType === 1) {
    const c = rgb(getComputedStyle(node).backgroundColor);
    if (c.length >= 3 && (c.length === 3 || c[3] > 0.5)) { bg = c.slice(0, 3); break; }
    node = node.parentElement;
  }
  return { text: rgb(getComputedStyle(el).color).slice(0, 3), background: bg || [255, 255, 255] };
}
"""
    )


def relative_luminance(rgb: list[float]) -> float:
    """WCAG relative luminance of an sRGB colour (0 black, 1 white)."""

    def channel(v: float) -> float:
        v /= 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a: list[float], b: list[float]) -> float:
    """WCAG contrast ratio of two colours (1 to 21; 4.5 is the minimum for body text)."""
    hi, lo = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def check_ran_clean(page: Page, label: str) -> None:
    """Every code cell of the open notebook ran, with no error output and no stray repr."""
    errors = find_errors(page, PANEL)
    assert not errors, f"{label}: error output in the browser:\n" + "\n---\n".join(errors)
    counts = execution_counts(page)
    assert counts and all(re.fullmatch(r"\[\d+\]:", c) for c in counts), (
        f"{label}: not every code cell ran: {counts}"
    )
    assert not stray_outputs(page), f"{label}: printed as text: {stray_outputs(page)}"


def open_dashboard_at(page: Page, url: str) -> Explorer:
    """Load the Voila dashboard at `url` and wait until it shows the shipped grid, drawn."""
    page.goto(url, timeout=180_000)
    root = page.locator(".lora-dashboard")
    expect(root).to_be_visible(timeout=180_000)
    explorer = Explorer(root)
    expect(explorer.status).to_contain_text(
        "sort_desc: 22 points selected, 22 cached, 0 to train", timeout=60_000
    )
    expect(explorer.visible_image).to_have_attribute("src", re.compile(r"^blob:"))
    return explorer
