"""A class on JupyterHub, in headless Chromium: two students at once, and the dashboard as a
hub service under the hub's proxy prefix.

One real JupyterHub for the module (servers.start_hub: 127.0.0.1, its own ports, run folder,
class password, configurable-http-proxy, local processes, a home per student). Two students log
in through the hub's login page, each in a Chromium of their own, get JupyterLab under
/user/<name>/lab, run the fine-tuning walkthrough (04) and the sweeps notebook (05) at the same
time, and press Run in the explorer on the same fast point at once: both finish with the same
numbers, each in the sweep cache under their own home, and the shipped grids in lab/data (one
copy in the checkout, shared by both) are unchanged. The dashboard loads through the hub's proxy
at /services/dashboard/ as it does at the root, and in Voilà's dark theme for a projector.
Every process the hub started is stopped by PID afterwards, and none may be left.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from pages import (
    PANEL,
    RUN_DONE,
    WIDGET_OUTPUT,
    Explorer,
    check_ran_clean,
    contrast_ratio,
    effective_colours,
    expect,
    find_errors,
    goto_notebook_at,
    hub_login,
    lab_is_up,
    open_dashboard_at,
    relative_luminance,
    run_state,
    stable_digest,
    start_run_all,
    stray_reprs,
    until_all,
    wait_for_notebook,
)
from servers import NOTEBOOKS, ROOT, start_hub

pytestmark = pytest.mark.browser

STUDENTS = ("alice", "bob")
# 04 is the fine-tuning walkthrough: LoRA and full fine-tuning, 300 steps each, on rotate.
FINE_TUNING = "04_fine_tuning.ipynb"
SWEEPS = "05_sweeps.ipynb"
DASHBOARDS = {"dashboard": [], "dashboard-dark": ["--theme=dark"]}
# The hub checks each service every 60 s, and each check renders the dashboard in a kernel no
# page connects to: Voilà culls those after 20 s idle (checked every 5 s), so at most one such
# kernel is alive at a time (an instructor would use minutes; the module lasts only a few).
CULLING = (20, 5)
SHIPPED = ROOT / "lab" / "data"
# Fields of a sweep result that say when, where and how fast it ran, not what it computed (and
# any field named *_seconds, e.g. the batched engine's chunk time).
RUN_FIELDS = {"date", "wall_seconds", "tokens_per_second", "device"}


def computed(value):
    """A sweep result (or part of one) without the fields that depend on the run's timing."""
    if isinstance(value, dict):
        return {
            k: computed(v)
            for k, v in value.items()
            if k not in RUN_FIELDS and not k.endswith("seconds")
        }
    return value


def shipped_hashes() -> dict[str, str]:
    """SHA-256 of every file the lab ships in lab/data (the grids and the base model)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(SHIPPED.iterdir())}


@pytest.fixture(scope="module")
def hub(configurable_http_proxy, chromium, tmp_path_factory, timings, shots):
    """One JupyterHub for the module; afterwards every process it started is stopped by PID,
    none may be left, and the shipped grids must be unchanged."""
    base = tmp_path_factory.mktemp("jupyterhub")
    shipped = shipped_hashes()
    server = start_hub(
        base, STUDENTS, notebooks=[NOTEBOOKS / FINE_TUNING, NOTEBOOKS / SWEEPS],
        dashboards=DASHBOARDS, dashboard_culling=CULLING,
    )  # fmt: skip
    timings("JupyterHub: start (hub, proxy, 2 Voila services)", server.started_seconds)
    try:
        yield server
    finally:
        start = time.perf_counter()
        killed = server.stop()
        seconds = time.perf_counter() - start
        timings("JupyterHub: stop (hub, proxy, servers, services, kernels)", seconds)
        left = server.processes()
        if server.log_path.exists():  # the hub's log holds the students' servers' output too
            shutil.copy(server.log_path, shots / "hub-jupyterhub.log")
        shutil.rmtree(base, ignore_errors=True)
        if killed:
            print(f"JupyterHub left {len(killed)} processes running; killed by PID: {killed}")
        assert not left, (
            f"still running after the hub stopped: {[(p.pid, p.cmdline) for p in left]}"
        )
        assert shipped_hashes() == shipped, "the shipped files in lab/data changed"


@pytest.fixture
def tabs(request, shots):
    """Pages a test opens, registered here: screenshots of each (FAILED-<test>-<n>.png) when
    the test fails, and each page's JavaScript errors collected in page.page_errors."""
    opened = []

    def register(page):
        page.page_errors = []
        page.on("pageerror", lambda exc: page.page_errors.append(f"page error: {exc}"))
        opened.append(page)
        return page

    yield register
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for i, page in enumerate(opened, 1):
            try:
                page.screenshot(path=shots / f"FAILED-{request.node.name}-{i}.png", timeout=15_000)
            except Exception as exc:  # the page may be gone; the failure matters more
                print(f"(no failure screenshot: {exc})")


def run_at_once(hub, pages: dict, name: str, shots, timings) -> None:
    """Every student opens notebooks/<name> in their JupyterLab, then all press Run All Cells
    one right after the other; waits for all; each one's time is recorded."""
    for who, page in pages.items():
        goto_notebook_at(page, hub.user_url(who), f"notebooks/{name}")
    for page in pages.values():
        wait_for_notebook(page)
    started = {who: start_run_all(page) for who, page in pages.items()}
    done = until_all(
        {who: (lambda page=page: run_state(page) == "idle") for who, page in pages.items()},
        timeout_s=900,
    )
    for who, page in pages.items():
        timings(f"JupyterHub: {who} runs all of {name} (both at once)", done[who] - started[who])
        page.screenshot(path=shots / f"hub-{who}-{name.removesuffix('.ipynb')}.png")
        check_ran_clean(page, f"{who}, {name}")


def result_files(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("*.json")}


def checkout_files_named(name: str) -> list[Path]:
    """Files called `name` anywhere in the checkout (its environment and history aside)."""
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in {".venv", ".git", "node_modules"}]
        found += [Path(folder) / f for f in files if f == name]
    return found


def test_two_students_fine_tune_and_press_run_at_once(hub, new_chromium, tabs, shots, timings):
    pages = {who: tabs(new_chromium(who).pages[0]) for who in STUDENTS}

    # The login page refuses a wrong password (and starts nothing).
    first = pages[STUDENTS[0]]
    hub_login(first, hub.url, STUDENTS[0], hub.password + "-wrong")
    expect(first.locator(".login_error")).to_contain_text("Invalid username or password")
    assert not [p for p in hub.processes() if p.kind == "server"]

    # Both log in at once; the hub spawns each a JupyterLab under /user/<name>/lab.
    submitted = {}
    for who, page in pages.items():
        hub_login(page, hub.url, who, hub.password)
        submitted[who] = time.perf_counter()
    ready = until_all(
        {who: (lambda p=p, who=who: lab_is_up(p, hub.user_url(who))) for who, p in pages.items()},
        timeout_s=300,
    )
    for who in STUDENTS:
        seconds = ready[who] - submitted[who]
        timings(f"JupyterHub: {who} logs in, server spawned, JupyterLab up", seconds)
    servers = {p.owner: p for p in hub.processes() if p.kind == "server"}
    assert sorted(servers) == sorted(STUDENTS), [(p.owner, p.cmdline) for p in servers.values()]
    for who, server in servers.items():
        assert server.env["HOME"] == str(hub.home(who)), server.env["HOME"]
        assert server.env["LORA_LAB_CACHE"] == str(hub.cache(who)), server.env["LORA_LAB_CACHE"]

    run_at_once(hub, pages, FINE_TUNING, shots, timings)
    run_at_once(hub, pages, SWEEPS, shots, timings)

    # Each student's kernels are their own, with their own home and sweep cache.
    kernels = [p for p in hub.processes() if p.kind == "kernel" and p.owner in STUDENTS]
    assert sorted({k.owner for k in kernels}) == sorted(STUDENTS), [k.cmdline for k in kernels]
    for kernel in kernels:
        assert kernel.env["HOME"] == str(hub.home(kernel.owner))
        assert kernel.env["LORA_LAB_CACHE"] == str(hub.cache(kernel.owner))

    # Both choose the same fast point and press Run at the same time.
    explorers = {}
    for who, page in pages.items():
        root = page.locator(f"{PANEL} {WIDGET_OUTPUT}")
        expect(root).to_have_count(1)
        explorer = explorers[who] = Explorer(root)
        explorer.check_structure()
        expect(explorer.status).to_contain_text("22 points selected, 22 cached, 0 to train")
        root.evaluate("e => e.scrollIntoView({block: 'start'})")
        explorer.open_tab("Loss")
        explorer.choose_one_fast_point()
        expect(explorer.status).to_contain_text("1 point selected, 0 cached, 1 to train")
    before = {who: stable_digest(e.visible_image) for who, e in explorers.items()}
    cached_before = {who: result_files(hub.cache(who)) for who in STUDENTS}
    assert cached_before[STUDENTS[0]] == cached_before[STUDENTS[1]]  # the shipped grids, seeded
    clicked = {}
    for who, explorer in explorers.items():
        explorer.run.click()
        clicked[who] = time.perf_counter()
    done = until_all(
        {who: (lambda e=e: bool(RUN_DONE.search(e.status.inner_text())))
         for who, e in explorers.items()},
        timeout_s=600,
    )  # fmt: skip
    for who in STUDENTS:
        timings(f"JupyterHub: {who} presses Run, 1 point (both at once)", done[who] - clicked[who])

    # The same numbers on both screens: the status line (but for the seconds it took) and the
    # loss and accuracy plots, byte for byte.
    status = {who: e.status.inner_text() for who, e in explorers.items()}
    shown = {who: re.sub(r" in \d+ s", " in N s", s) for who, s in status.items()}
    assert shown[STUDENTS[0]] == shown[STUDENTS[1]], status
    for who in STUDENTS:
        pages[who].screenshot(path=shots / f"hub-{who}-after-run.png")
        assert "error" not in status[who].lower(), status[who]
    loss = {who: stable_digest(e.visible_image) for who, e in explorers.items()}
    assert all(loss[who] != before[who] for who in STUDENTS), "a loss plot did not redraw"
    assert loss[STUDENTS[0]] == loss[STUDENTS[1]], "the two students' loss plots differ"
    accuracy = {}
    for who, explorer in explorers.items():
        explorer.open_tab("Accuracy")
        accuracy[who] = stable_digest(explorer.visible_image)
    assert accuracy[STUDENTS[0]] == accuracy[STUDENTS[1]], "the accuracy plots differ"
    for who, page in pages.items():
        assert not find_errors(page, PANEL), find_errors(page, PANEL)
        assert not stray_reprs(explorers[who].root.inner_text())
        for message in page.page_errors:
            print(f"{who}: {message}")

    # Each result lives in its own student's cache, under their home; none in the checkout.
    new = {who: sorted(result_files(hub.cache(who)) - cached_before[who]) for who in STUDENTS}
    assert all(len(files) == 1 for files in new.values()), new
    assert new[STUDENTS[0]] == new[STUDENTS[1]], new  # the same point: the same key
    key = new[STUDENTS[0]][0]
    paths = {who: hub.cache(who) / key for who in STUDENTS}
    assert not os.path.samefile(*paths.values()), "the two students share one cache file"
    for who, path in paths.items():
        assert path.is_relative_to(hub.home(who)), path
        assert not list(path.parent.glob("*.lock")), f"{who}: a lock was left behind"
    assert not checkout_files_named(key), checkout_files_named(key)
    results = {who: json.loads(path.read_text()) for who, path in paths.items()}
    numbers = {who: computed(r) for who, r in results.items()}
    assert numbers[STUDENTS[0]] == numbers[STUDENTS[1]], "the same point trained to other numbers"
    assert numbers[STUDENTS[0]]["losses"] and numbers[STUDENTS[0]]["heldout"], numbers
    # Trained at the same time, not one after the other: the two runs overlap.
    spans = {}
    for who, path in paths.items():
        end = path.stat().st_mtime
        spans[who] = (end - results[who]["wall_seconds"], end)
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans
    loss_at_end = results[STUDENTS[0]]["losses"][-1]
    print(f"both: held-out {results[STUDENTS[0]]['heldout']}, last loss {loss_at_end:.4f}")

    # For comparison, one student alone: a point of the same cost (rank 2 instead of 1).
    alone, explorer = STUDENTS[0], explorers[STUDENTS[0]]
    explorer.lists.nth(0).select_option(label=["2"])
    expect(explorer.status).to_contain_text("1 point selected, 0 cached, 1 to train")
    start = time.perf_counter()
    explorer.run.click()
    expect(explorer.status).to_contain_text(RUN_DONE, timeout=300_000)
    timings(f"JupyterHub: {alone} presses Run, 1 point (alone)", time.perf_counter() - start)
    assert len(result_files(hub.cache(alone))) == len(cached_before[alone]) + 2
    assert result_files(hub.cache(STUDENTS[1])) == cached_before[STUDENTS[1]] | {key}


def service_kernels(hub, name: str) -> list:
    return [p for p in hub.processes() if p.kind == "kernel" and p.owner == name]


def check_kernels_do_not_pile_up(hub, name: str) -> None:
    """The open page's kernel and at most two from the hub's checks of the service (the latest,
    and the one before while it waits to be culled); without culling there is one more for every
    minute the hub has run."""
    kernels = service_kernels(hub, name)
    assert 1 <= len(kernels) <= 3, f"{name}: {len(kernels)} kernels: {[k.pid for k in kernels]}"


def test_dashboard_through_the_hub_proxy_prefix(hub, new_chromium, tabs, shots, timings):
    """The dashboard as a hub service at /services/dashboard/: it loads, draws, answers a
    control change, and every request (pages, static files, the kernel's websocket) stays
    under the prefix and succeeds."""
    page = tabs(new_chromium("visitor").new_page())
    prefix = hub.service_url("dashboard")
    responses, failed, sockets = [], [], []
    page.on("response", lambda r: responses.append((r.status, r.url)))
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
    page.on("websocket", lambda ws: sockets.append(ws.url))

    start = time.perf_counter()
    explorer = open_dashboard_at(page, prefix)
    seconds = time.perf_counter() - start
    timings("JupyterHub: dashboard service, first load (runs the notebook)", seconds)
    explorer.check_structure()
    page.screenshot(path=shots / "hub-dashboard.png")

    explorer.open_tab("Loss")
    before = stable_digest(explorer.visible_image)
    explorer.lists.nth(0).select_option(label=["1", "2", "4"])
    expect(explorer.status).to_contain_text("sort_desc: 10 points selected, 10 cached, 0 to train")
    after = stable_digest(explorer.visible_image)
    assert after != before, "the loss plot did not redraw after a control change"
    page.screenshot(path=shots / "hub-dashboard-changed.png")

    text = page.locator("body").inner_text()
    assert not find_errors(page), find_errors(page)
    assert not stray_reprs(text), stray_reprs(text)
    assert not page.page_errors, page.page_errors
    origin = hub.url
    ours = [(status, url) for status, url in responses if url.startswith(origin)]
    assert ours, "no responses recorded"
    outside = [url for _, url in ours if not url.startswith(prefix)]
    assert not outside, f"requests that left the service's prefix: {outside}"
    bad = [(status, url) for status, url in ours if status >= 400]
    assert not bad, f"failed requests: {bad}"
    assert not [f for f in failed if f.startswith(origin)], failed
    assert sockets and all(url.startswith(prefix.replace("http", "ws", 1)) for url in sockets), (
        sockets
    )
    check_kernels_do_not_pile_up(hub, "dashboard")


def test_dark_dashboard_for_a_projector(hub, new_chromium, tabs, shots, timings):
    """`voila --theme=dark` (a second service): the page is dark and the status line readable."""
    page = tabs(new_chromium("projector").new_page())
    start = time.perf_counter()
    explorer = open_dashboard_at(page, hub.service_url("dashboard-dark"))
    timings("JupyterHub: dark dashboard service, first load", time.perf_counter() - start)
    page.screenshot(path=shots / "hub-dashboard-dark.png")
    expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "false")
    colours = effective_colours(explorer.status.locator(".widget-html-content"))
    assert relative_luminance(colours["background"]) < 0.1, colours  # a dark page
    ratio = contrast_ratio(colours["text"], colours["background"])
    assert ratio >= 4.5, f"status line contrast {ratio:.1f} < 4.5: {colours}"
    labels = effective_colours(explorer.root.locator(".widget-html-content b").first)
    assert contrast_ratio(labels["text"], labels["background"]) >= 4.5, labels
    assert not find_errors(page), find_errors(page)
    assert not page.page_errors, page.page_errors
    check_kernels_do_not_pile_up(hub, "dashboard-dark")
