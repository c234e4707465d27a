"""A class on JupyterHub, as docs/instructors.md sets it up, in headless Chromium.

The hub is docs/hub/jupyterhub_config.py, the file the docs tell an instructor to run, started as
root the way they say (tests/browser/hub.py), with real local accounts the test makes: a student
group, two students in it, one outsider who is not, and the dashboard's own system user, every
home 0700. The lab runs from a copy made as the docs say (readable by all, no answer key in it),
through a venv of /usr/bin/python3 that every account can run.

1. Logging in: a wrong password and an account outside the group are refused; both students log
   in through the hub's login page at once and each gets JupyterLab running as their own OS user.
   Neither sees nbgrader's instructor UI (no Nbgrader menu, no Create Assignment panel, the
   formgrader answers 404), though each has a ~/.jupyter configuration asking for it back; the
   Assignment List is in the File menu. Both run the fine-tuning
   walkthrough (04) and the sweeps notebook (05) at once and press Run in the explorer on the same
   point at the same moment: the same numbers, each in the sweep cache under their own home.
2. Privacy: as each student (runuser), the other's home, notebooks, sweep cache, IPython history
   and server environment (its hub token), the hub's state, the dashboard's home, the answer key
   and a write into the lab's copy are all tried, and all refused.
3. The dashboard, a hub service running as its own user: it loads through the hub's proxy at
   /services/dashboard/ with every request under that prefix, in the dark theme for a projector
   (?theme=dark), and its idle kernels are culled: sampled all through the module.

Every process the hub started is stopped by PID, and every account removed, even on failure.
Memory (RSS from /proc) of an idle student server and after notebook 04, the dashboard's kernels
over the module, and login times go to test-artifacts/browser/ (capacity.json, timings.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hub import (
    ACCOUNT_TOOLS,
    DASHBOARD_CULL,
    RECIPE,
    make_accounts,
    make_copy,
    remove_accounts,
    rss_mb,
    start_hub,
    try_as,
)
from needs import skip_or_fail
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
from servers import NOTEBOOKS, ROOT

from tests import system_venv

pytestmark = pytest.mark.browser

FINE_TUNING = "04_fine_tuning.ipynb"
SWEEPS = "05_sweeps.ipynb"
# Fields of a sweep result that say when, where and how fast it ran, not what it computed (and
# any field named *_seconds, e.g. the batched engine's chunk time).
RUN_FIELDS = {"date", "wall_seconds", "tokens_per_second", "device"}
CAPACITY: dict[str, object] = {}  # memory figures, written to capacity.json at the end
ARTIFACTS = ROOT / "test-artifacts" / "browser"


def answer_key() -> Path:
    """Where the lab keeps the exercises' answer key (read, never assumed)."""
    from lab.exercises.course import SOURCE

    return Path(SOURCE)


def computed(value):
    """A sweep result (or part of one) without the fields that depend on the run's timing."""
    if isinstance(value, dict):
        return {
            k: computed(v)
            for k, v in value.items()
            if k not in RUN_FIELDS and not k.endswith("seconds")
        }
    return value


def digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder`."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class KernelSampler(threading.Thread):
    """Every `every` seconds: how many kernels the dashboard's user runs, and their RSS."""

    def __init__(self, hub, every: float = 5.0):
        super().__init__(daemon=True)
        self.hub, self.every, self.samples = hub, every, []
        self.halt = threading.Event()

    def kernels(self) -> list[int]:
        owner = self.hub.accounts.dashboard.name
        return [p.pid for p in self.hub.processes() if p.kind == "kernel" and p.owner == owner]

    def run(self) -> None:
        start = time.monotonic()
        while not self.halt.is_set():
            pids = self.kernels()
            self.samples.append((round(time.monotonic() - start), len(pids), rss_mb(pids)))
            self.halt.wait(self.every)


@pytest.fixture(scope="module")
def class_venv() -> Path:
    """The venv every account runs (built once, cached in /var/tmp); skips without root."""
    if sys.platform != "linux" or os.geteuid() != 0:
        skip_or_fail("the hub test needs root on Linux: it makes accounts and runs the hub as root")
    missing = [tool for tool in ACCOUNT_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the hub test needs {missing} (Debian: passwd and util-linux)")
    return system_venv.class_venv()


@pytest.fixture(scope="module")
def hub(configurable_http_proxy, chromium, class_venv, tmp_path_factory, timings, shots):
    """The recipe's hub with the test's accounts; afterwards every process is stopped by PID,
    none may be left, every account is removed and the lab's copy is unchanged."""
    base = tmp_path_factory.mktemp("jupyterhub")  # root's own: the hub's state and log
    shared = Path(tempfile.mkdtemp(prefix="llt-copy-", dir="/var/tmp"))
    shared.chmod(0o755)
    copy = shared / "lora-lab"
    accounts, server, sampler = None, None, None
    try:
        key = make_copy(copy, answer_key())
        copied = digests(copy)
        accounts = make_accounts(students=2)
        for student in accounts.students:
            student_home(student)
        server = start_hub(base, class_venv, copy, accounts)
        server.copy, server.venv, server.answer_key = copy, class_venv, key
        timings("JupyterHub: start (hub, proxy, dashboard, idle culler)", server.started_seconds)
        sampler = KernelSampler(server)
        sampler.start()
        server.sampler = sampler
        yield server
        assert digests(copy) == copied, "a file in the lab's shared copy changed"
    finally:
        if sampler is not None:
            sampler.halt.set()
            sampler.join(timeout=30)
            CAPACITY["dashboard kernels (s since start, count, MB)"] = sampler.samples
        problems = []
        if server is not None:
            start = time.perf_counter()
            killed = server.stop()
            timings("JupyterHub: stop (hub, proxy, servers, services)", time.perf_counter() - start)
            left = server.processes()
            if server.log_path.exists():  # the students' servers log into the hub's log
                shutil.copy(server.log_path, shots / "hub-jupyterhub.log")
            if killed:
                print(f"JupyterHub left {len(killed)} processes running; killed by PID: {killed}")
            if left:
                problems.append(f"still running: {[(p.pid, p.cmdline) for p in left]}")
        if accounts is not None:
            problems += remove_accounts(accounts)
        shutil.rmtree(shared, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "capacity.json").write_text(json.dumps(CAPACITY, indent=1) + "\n")
        assert not problems, problems


def student_home(account) -> None:
    from hub import give_home

    give_home(account, [NOTEBOOKS / FINE_TUNING, NOTEBOOKS / SWEEPS])


@pytest.fixture(scope="module")
def students(hub, new_chromium):
    """A Chromium of their own for each student, and one for the outsider."""
    return {a.name: new_chromium(a.name) for a in [*hub.accounts.students, hub.accounts.outsider]}


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
        seconds = done[who] - started[who]
        timings(f"JupyterHub: {label(hub, who)} runs all of {name} (both at once)", seconds)
        page.screenshot(path=shots / f"hub-{who}-{name.removesuffix('.ipynb')}.png")
        check_ran_clean(page, f"{who}, {name}")


def label(hub, who: str) -> str:
    """'student 1' or 'student 2' (the accounts' names change from run to run)."""
    names = [a.name for a in hub.accounts.students]
    return f"student {names.index(who) + 1}"


def result_files(cache: Path) -> set[str]:
    return {p.name for p in cache.glob("*.json")}


def user_processes(hub, who: str, kind: str) -> list:
    return [p for p in hub.processes() if p.owner == who and p.kind == kind]


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def check_no_instructor_ui(hub, page, who: str) -> None:
    """No Nbgrader menu, no Create Assignment panel, no formgrader (though the student's own
    ~/.jupyter asks for them: hub.HOSTILE_CONFIG); the Assignment List is in the File menu and
    opens."""
    menus = page.locator("#jp-menu-panel .lm-MenuBar-itemLabel").all_inner_texts()
    assert "File" in menus and not [m for m in menus if "grader" in m.lower()], menus
    sidebars = page.locator(".jp-SideBar .lm-TabBar-tab").evaluate_all(
        "tabs => tabs.map(t => [t.title, t.dataset.id || '', t.innerText].join(' '))"
    )
    assert not [t for t in sidebars if re.search("assignment|grader", t, re.I)], sidebars
    for path in ("formgrader", "formgrader/gradebook", "formgrader/api/assignments"):
        status = page.request.get(f"{hub.user_url(who)}/{path}", max_redirects=0).status
        assert status == 404, f"{who}: /user/{who}/{path} answered {status}, not 404"
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^File$")).click()
    page.get_by_role("menuitem", name="Assignment List").click()
    expect(page.locator(".lm-TabBar-tab", has_text="Assignments")).to_be_visible()


def test_two_students_log_in_and_fine_tune_at_once(hub, students, tabs, shots, timings):
    accounts = hub.accounts
    names = [a.name for a in accounts.students]
    pages = {a.name: tabs(students[a.name].pages[0]) for a in accounts.students}
    for a in accounts.students:
        assert os.stat(a.home).st_mode & 0o777 == 0o700, f"{a.home} is not 0700"

    # A wrong password, and a real account outside the group with its right password: refused,
    # and no server started.
    first = pages[names[0]]
    hub_login(first, hub.url, names[0], accounts.students[0].password + "-wrong")
    expect(first.locator(".login_error")).to_contain_text("Invalid username or password")
    outsider = tabs(students[accounts.outsider.name].pages[0])
    hub_login(outsider, hub.url, accounts.outsider.name, accounts.outsider.password)
    expect(outsider.locator(".login_error")).to_contain_text("Invalid username or password")
    assert f"User '{accounts.outsider.name}' not allowed" in hub.log_tail(1 << 20)
    assert not [p for p in hub.processes() if p.kind == "server"]

    # Both log in at once; the hub starts each a JupyterLab as their own OS user.
    submitted = {}
    for a in accounts.students:
        hub_login(pages[a.name], hub.url, a.name, a.password)
        submitted[a.name] = time.perf_counter()
    ready = until_all(
        {who: (lambda p=p, who=who: lab_is_up(p, hub.user_url(who))) for who, p in pages.items()},
        timeout_s=300,
    )
    for who in names:
        seconds = ready[who] - submitted[who]
        timings(f"JupyterHub: {label(hub, who)} logs in, server spawned, JupyterLab up", seconds)
    for a in accounts.students:
        servers = user_processes(hub, a.name, "server")
        assert len(servers) == 1, [p.cmdline for p in hub.processes()]
        env = environ(servers[0].pid)
        assert env["HOME"] == str(a.home) and env["JUPYTERHUB_USER"] == a.name, env
        assert env["JUPYTER_CONFIG_PATH"] == str(hub.copy / "docs" / "hub" / "student-jupyter")
        check_no_instructor_ui(hub, pages[a.name], a.name)
        pages[a.name].screenshot(path=shots / f"hub-{a.name}-assignment-list.png")
    # Logged in as one student, the other's JupyterLab is refused (the hub's OAuth says no).
    for me, other in (names, names[::-1]):
        answer = pages[me].request.get(f"{hub.user_url(other)}/api/contents/notebooks")
        assert answer.status == 403 and FINE_TUNING not in answer.text(), (me, answer.status)
    time.sleep(5)  # the page settled: the server idle, no kernel yet
    CAPACITY["idle student server, MB (RSS)"] = [
        round(rss_mb([p.pid for p in user_processes(hub, who, "server")])) for who in names
    ]

    run_at_once(hub, pages, FINE_TUNING, shots, timings)
    CAPACITY["student server and kernel after notebook 04, MB (RSS)"] = [
        round(rss_mb([p.pid for p in hub.processes() if p.owner == who])) for who in names
    ]
    run_at_once(hub, pages, SWEEPS, shots, timings)

    # Each student's kernels are their own, as their own user, with their own home.
    for a in accounts.students:
        kernels = user_processes(hub, a.name, "kernel")
        assert kernels, f"{a.name} has no kernel"
        for kernel in kernels:
            assert environ(kernel.pid)["HOME"] == str(a.home)

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
    caches = {a.name: hub.cache(a) for a in accounts.students}
    before = {who: stable_digest(e.visible_image) for who, e in explorers.items()}
    cached_before = {who: result_files(caches[who]) for who in names}
    assert cached_before[names[0]] == cached_before[names[1]]  # the shipped grids, seeded
    clicked = {}
    for who, explorer in explorers.items():
        explorer.run.click()
        clicked[who] = time.perf_counter()
    done = until_all(
        {who: (lambda e=e: bool(RUN_DONE.search(e.status.inner_text())))
         for who, e in explorers.items()},
        timeout_s=600,
    )  # fmt: skip
    for who in names:
        seconds = done[who] - clicked[who]
        timings(f"JupyterHub: {label(hub, who)} presses Run, 1 point (both at once)", seconds)

    # The same numbers on both screens: the status line (but for the seconds it took) and the
    # loss and accuracy plots, byte for byte.
    status = {who: e.status.inner_text() for who, e in explorers.items()}
    shown = {who: re.sub(r" in \d+ s", " in N s", s) for who, s in status.items()}
    assert shown[names[0]] == shown[names[1]], status
    for who in names:
        pages[who].screenshot(path=shots / f"hub-{who}-after-run.png")
        assert "error" not in status[who].lower(), status[who]
    loss = {who: stable_digest(e.visible_image) for who, e in explorers.items()}
    assert all(loss[who] != before[who] for who in names), "a loss plot did not redraw"
    assert loss[names[0]] == loss[names[1]], "the two students' loss plots differ"
    accuracy = {}
    for who, explorer in explorers.items():
        explorer.open_tab("Accuracy")
        accuracy[who] = stable_digest(explorer.visible_image)
    assert accuracy[names[0]] == accuracy[names[1]], "the accuracy plots differ"
    for who, page in pages.items():
        assert not find_errors(page, PANEL), find_errors(page, PANEL)
        assert not stray_reprs(explorers[who].root.inner_text())
        for message in page.page_errors:
            print(f"{who}: {message}")

    # Each result lives in its own student's cache, under their home and owned by them.
    new = {who: sorted(result_files(caches[who]) - cached_before[who]) for who in names}
    assert all(len(files) == 1 for files in new.values()), new
    assert new[names[0]] == new[names[1]], new  # the same point: the same key
    key = new[names[0]][0]
    paths = {who: caches[who] / key for who in names}
    for a in accounts.students:
        path = paths[a.name]
        assert path.is_relative_to(a.home) and path.stat().st_uid == a.uid, path
        assert not list(path.parent.glob("*.lock")), f"{a.name}: a lock was left behind"
    assert not list(hub.copy.rglob(key)), "a result was written into the lab's shared copy"
    results = {who: json.loads(path.read_text()) for who, path in paths.items()}
    numbers = {who: computed(r) for who, r in results.items()}
    assert numbers[names[0]] == numbers[names[1]], "the same point trained to other numbers"
    assert numbers[names[0]]["losses"] and numbers[names[0]]["heldout"], numbers
    # Trained at the same time, not one after the other: the two runs overlap.
    spans = {}
    for who, path in paths.items():
        end = path.stat().st_mtime
        spans[who] = (end - results[who]["wall_seconds"], end)
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), spans


def test_students_cannot_read_each_other_nor_the_answer_key(hub):
    """As each student (runuser, the class venv's Python): everything of the other student's
    (their files, their server's environment, their JupyterLab directly or through the proxy),
    the hub's state, the dashboard's home and the answer key are refused; so is writing into the
    lab's copy. Their own notebook opens (the probe itself works)."""
    accounts = hub.accounts
    key = hub.answer_key
    assert not key.exists(), f"the answer key is in the students' copy: {key}"
    with_answers = [
        str(p.relative_to(hub.copy))
        for p in hub.copy.rglob("*.ipynb")
        if "### BEGIN SOLUTION" in p.read_text(errors="replace")
    ]
    assert not with_answers, f"notebooks with answers in the students' copy: {with_answers}"
    assert os.stat(hub.state).st_mode & 0o777 == 0o700, "the hub's state folder is not 0700"
    table = []
    for me, other in (accounts.students, accounts.students[::-1]):
        cache = hub.cache(other)
        results = sorted(cache.glob("*.json"))
        servers = user_processes(hub, other.name, "server")
        own_server, other_server = (
            environ(user_processes(hub, a.name, "server")[0].pid)["JUPYTERHUB_SERVICE_URL"].rstrip(
                "/"
            )
            for a in (me, other)
        )
        attempts = [
            ("own notebook", str(me.home / "notebooks" / FINE_TUNING), "read"),
            ("other's home", str(other.home), "list"),
            ("other's notebook", str(other.home / "notebooks" / FINE_TUNING), "read"),
            ("other's sweep cache", str(cache), "list"),
            ("other's trained result", str(results[-1] if results else cache / "x.json"), "read"),
            ("other's IPython history",
             str(other.home / ".ipython" / "profile_default" / "history.sqlite"), "read"),
            ("other's server environment (its hub API token)",
             f"/proc/{servers[0].pid}/environ" if servers else "/proc/1/environ", "read"),
            ("other's JupyterLab, directly on its port",
             f"{other_server}/api/contents/notebooks", "http"),
            ("other's JupyterLab, through the hub's proxy",
             f"{hub.user_url(other.name)}/api/contents/notebooks", "http"),
            ("own JupyterLab without a token, directly on its port",
             f"{own_server}/api/contents/notebooks", "http"),
            ("the hub's database", str(hub.state / "jupyterhub.sqlite"), "read"),
            ("the hub's cookie secret", str(hub.state / "jupyterhub_cookie_secret"), "read"),
            ("the dashboard user's home", str(accounts.dashboard.home), "list"),
            ("the answer key in the shared copy", str(key), "read"),
            ("a new file in the lab's copy", str(hub.copy / "lab" / "probe.py"), "write"),
            ("the shipped grids", str(next((hub.copy / "lab" / "data").glob("*.json"))), "write"),
        ]  # fmt: skip
        for what, path, action, outcome in try_as(me, hub.venv, attempts):
            table.append(f"{me.name}: {action} {what} ({path}): {outcome}")
            if what == "own notebook":
                assert outcome == "allowed", f"{me.name} cannot read their own notebook: {outcome}"
            else:
                assert outcome != "allowed", f"{me.name} could {action} {what}: {path}"
    print("\n".join(table))
    CAPACITY["isolation: tried as a student, and refused"] = table


def service_kernels(hub) -> list:
    return user_processes(hub, hub.accounts.dashboard.name, "kernel")


def test_dashboard_through_the_hub_proxy_prefix(hub, new_chromium, tabs, shots, timings):
    """The dashboard as a hub service at /services/dashboard/, run by its own user: it loads,
    draws, answers a control change, and every request (pages, static files, the kernel's
    websocket) stays under the prefix and succeeds."""
    owner = hub.accounts.dashboard.name
    voila = [p for p in hub.processes() if "voila" in p.cmdline and p.kind == "service"]
    assert voila and all(p.owner == owner for p in voila), [(p.owner, p.cmdline) for p in voila]
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
    kernels = service_kernels(hub)
    assert kernels and all(p.owner == owner for p in kernels)

    explorer.open_tab("Loss")
    before = stable_digest(explorer.visible_image)
    explorer.lists.nth(0).select_option(label=["1", "2", "4"])
    expect(explorer.status).to_contain_text("sort_desc: 10 points selected, 10 cached, 0 to train")
    assert stable_digest(explorer.visible_image) != before, "the plot did not redraw"

    text = page.locator("body").inner_text()
    assert not find_errors(page), find_errors(page)
    assert not stray_reprs(text), stray_reprs(text)
    assert not page.page_errors, page.page_errors
    ours = [(status, url) for status, url in responses if url.startswith(hub.url)]
    assert ours, "no responses recorded"
    outside = [url for _, url in ours if not url.startswith(prefix)]
    assert not outside, f"requests that left the service's prefix: {outside}"
    bad = [(status, url) for status, url in ours if status >= 400]
    assert not bad, f"failed requests: {bad}"
    assert not [f for f in failed if f.startswith(hub.url)], failed
    assert sockets and all(url.startswith(prefix.replace("http", "ws", 1)) for url in sockets), (
        sockets
    )
    page.close()


def test_dark_dashboard_for_a_projector(hub, new_chromium, tabs, shots, timings):
    """The same service with ?theme=dark: the page is dark and the status line readable."""
    page = tabs(new_chromium("projector").new_page())
    start = time.perf_counter()
    explorer = open_dashboard_at(page, hub.service_url("dashboard") + "?theme=dark")
    timings("JupyterHub: dark dashboard, first load", time.perf_counter() - start)
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
    page.close()


def test_dashboard_kernels_do_not_pile_up(hub):
    """With nobody on the page, the dashboard's kernels go (the hub's start-up check and every
    closed page): none is left within the cull time, and there were never more than one per
    page the module opened (a closed page's lives until it is culled) plus the start-up check's."""
    # cull_idle_timeout DASHBOARD_CULL s, checked every DASHBOARD_CULL / 4, and slack
    deadline = time.monotonic() + 2 * DASHBOARD_CULL + 60
    while service_kernels(hub) and time.monotonic() < deadline:
        time.sleep(1)
    left = service_kernels(hub)
    peak = max((count for _, count, _ in hub.sampler.samples), default=0)
    most = max((mb for _, _, mb in hub.sampler.samples), default=0.0)
    CAPACITY["dashboard kernels: peak count, peak MB"] = [peak, round(most)]
    print(f"dashboard kernels over the module: peak {peak}, {most:.0f} MB; left idle: {left}")
    assert not left, f"idle dashboard kernels still alive: {[p.pid for p in left]}"
    pages = 2  # the dashboard, then the same service dark
    assert peak <= 1 + pages, hub.sampler.samples


def load_recipe(monkeypatch, tmp_path, **env):
    """The recipe's configuration as JupyterHub loads it, with these environment variables
    (its state folder in tmp_path unless given)."""
    from traitlets.config.loader import PyFileConfigLoader

    for name in [n for n in os.environ if n.startswith("LORA_LAB_") and n != "LORA_LAB_CACHE"]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LORA_LAB_HUB_STATE", str(tmp_path / "state"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return PyFileConfigLoader(RECIPE.name, str(RECIPE.parent)).load_config()


def test_the_docs_state_the_recipes_class_defaults(monkeypatch, tmp_path):
    """What docs/instructors.md says the recipe sets is what it sets, with no variable given
    (no hub started, no root needed)."""
    c = load_recipe(monkeypatch, tmp_path)
    docs = (ROOT / "docs" / "instructors.md").read_text()
    assert c.JupyterHub.authenticator_class == "pam"
    assert c.PAMAuthenticator.allowed_groups == {"lora-students"}
    assert c.JupyterHub.spawner_class == "localprocess"
    assert c.Spawner.cmd == ["/opt/lora-lab/.venv/bin/python", "-m", "jupyterhub.singleuser"]
    assert c.Spawner.default_url == "/lab" and c.Spawner.disable_user_config is True
    assert c.JupyterHub.bind_url == "http://:8000" and c.JupyterHub.hub_port == 8081
    assert c.ConfigurableHTTPProxy.api_url == "http://127.0.0.1:8001"
    assert c.JupyterHub.service_check_interval == 0
    state = tmp_path / "state"
    assert c.JupyterHub.db_url == f"sqlite:///{state / 'jupyterhub.sqlite'}"
    assert os.stat(state).st_mode & 0o777 == 0o700
    services = {s["name"]: s for s in c.JupyterHub.services}
    assert services["dashboard"]["user"] == "lora-dashboard"
    assert services["dashboard"]["url"] == "http://127.0.0.1:8866"
    assert "--MappingKernelManager.cull_idle_timeout=120" in services["dashboard"]["command"]
    assert "--MappingKernelManager.cull_interval=30" in services["dashboard"]["command"]
    assert "jupyterhub_idle_culler" in services["idle-culler"]["command"]
    env = c.Spawner.environment
    assert env["JUPYTER_CONFIG_PATH"] == "/opt/lora-lab/docs/hub/student-jupyter"
    for fact in (
        "`/srv/lora-lab-hub`",
        "**8000**",
        "**8081**",
        "**8001**",
        "**8866**",
        "lora-students",
        "lora-dashboard",
        "`/opt/lora-lab/.venv`",
        "cull_idle_timeout=120",
        "service_check_interval = 0",
        "--timeout=3600",
    ):
        assert fact in docs, f"docs/instructors.md no longer says {fact}"
    # The docs include the recipe by reference, not a second copy of it.
    assert "c.JupyterHub.authenticator_class" not in docs


def test_the_dashboards_cull_time_can_be_shortened_and_a_bad_one_is_refused(monkeypatch, tmp_path):
    c = load_recipe(monkeypatch, tmp_path, LORA_LAB_DASHBOARD_CULL="30")
    command = {s["name"]: s for s in c.JupyterHub.services}["dashboard"]["command"]
    assert "--MappingKernelManager.cull_idle_timeout=30" in command
    assert "--MappingKernelManager.cull_interval=7" in command
    for value in ("abc", "9", "86401", "2.5", "-30"):
        with pytest.raises(ValueError, match=r"LORA_LAB_DASHBOARD_CULL=.*whole seconds from 10"):
            load_recipe(monkeypatch, tmp_path, LORA_LAB_DASHBOARD_CULL=value)


@pytest.mark.parametrize("value", ["abc", "0", "65536", "80.5", "-1", " 8000"])
def test_a_bad_port_in_the_recipes_environment_is_refused_by_name(monkeypatch, tmp_path, value):
    with pytest.raises(ValueError, match=r"LORA_LAB_HUB_PORT=.*a TCP port, a whole number"):
        load_recipe(monkeypatch, tmp_path, LORA_LAB_HUB_PORT=value)
