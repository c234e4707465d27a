"""What every committed notebook must be, checked on the files themselves (nbval runs them).

- No test machinery in what a student reads: nbval is steered by cell tags, never by comments.
- No widget state in the committed metadata or outputs.
- A checked output shows a measured number next to its claim, never a bare ``True``.
- A float-rounding magnitude (which moves with the CPU's kernels) is printed as
  ``<value> (... rounding: under <bound>)``: the sanitizer hides the value, so nbval compares the
  bound the cell asserts, and a different machine's rounding cannot fail the notebook.
"""

import configparser
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
NOTEBOOKS = ROOT / "notebooks"
SANITIZE = ROOT / "tests" / "nbval" / "sanitize.cfg"  # pyproject.toml's addopts name it
PATHS = sorted(NOTEBOOKS.rglob("*.ipynb"))
IDS = [str(p.relative_to(NOTEBOOKS)) for p in PATHS]
UNCHECKED = {"nbval-ignore-output", "nbval-skip"}
SCIENTIFIC = re.compile(r"\d(\.\d+)?e[-+]\d\d")
BARE = re.compile(r":\s*(True|False)\s*$")  # a claim printed as a boolean


def load(path):
    return json.loads(path.read_text())


def sanitizers():
    config = configparser.ConfigParser()
    assert config.read(SANITIZE), f"{SANITIZE} is missing"
    return [(re.compile(config[s]["regex"]), config[s]["replace"]) for s in config.sections()]


def sanitize(text):
    for regex, replace in sanitizers():
        text = regex.sub(replace, text)
    return text


def checked_lines(notebook):
    """Every line of output that nbval compares (cells not tagged to be skipped or ignored)."""
    for cell in notebook["cells"]:
        if cell["cell_type"] != "code" or UNCHECKED & set(cell["metadata"].get("tags", [])):
            continue
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            yield from "".join(text).splitlines()


def test_every_notebook_is_found():
    assert {"01_welcome.ipynb", "09_what_practitioners_learned.ipynb"} <= {p.name for p in PATHS}
    assert "exercises/student.ipynb" in IDS
    # The answer key stays out of the students' folder (pyproject's testpaths run it under nbval).
    assert not any("BEGIN SOLUTION" in p.read_text() for p in PATHS)
    assert (ROOT / "course" / "lora_by_hand.ipynb").is_file()


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_no_test_machinery_in_what_a_student_reads(path):
    for cell in load(path)["cells"]:
        source = "".join(cell["source"])
        assert "NBVAL" not in source, source[:200]
        assert not re.search(r"the tests? (skip|ignore)", source, re.I), source[:200]


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_no_widget_state_is_committed(path):
    notebook = load(path)
    assert "widgets" not in notebook["metadata"]
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            assert "application/vnd.jupyter.widget-state+json" not in output.get("data", {})


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_checked_outputs_show_numbers_not_booleans(path):
    bare = [line for line in checked_lines(load(path)) if BARE.search(line)]
    assert not bare, f"print the measured value next to the claim instead: {bare}"


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_rounding_magnitudes_are_compared_by_their_bound(path):
    for line in checked_lines(load(path)):
        if "rounding" not in line:
            continue
        kept = re.sub(r"under \d(\.\d+)?e-\d+", "", sanitize(line))
        hint = "print it as '<value> (float32 rounding: under <bound>)'"
        assert not SCIENTIFIC.search(kept), f"{hint}: {line}"


def test_a_bare_boolean_claim_is_caught():
    assert BARE.search("equal to the published table within 1e-6: True")
    assert not BARE.search("gap to the published table: 3e-08 (its 8-digit rounding: under 1e-6)")
    assert not BARE.search("  in_features=128, rank=8, rslora=False, merged=False")  # a repr


def test_the_rounding_sanitizer_hides_the_value_and_keeps_the_bound():
    line = "fp32 merged output error: 4e-07 (float32 rounding: under 1e-5)"
    other = "fp32 merged output error: 1e-06 (float32 rounding: under 1e-5)"
    assert sanitize(line) == sanitize(other) == (
        "fp32 merged output error: [ROUNDING] (float32 rounding: under 1e-5)")  # fmt: skip
    assert sanitize(line) != sanitize(line.replace("under 1e-5", "under 1e-6"))
    # A number that is not a rounding magnitude is still compared.
    assert sanitize("lr 2e-02 (under 1e-3)") == "lr 2e-02 (under 1e-3)"


# --------------------------------------------------------------------------------------------
# What the prose says is true: paths, the map, benchmark numbers, time promises
# --------------------------------------------------------------------------------------------

LESSONS = [p for p in PATHS if p.parent == NOTEBOOKS and p.name[:2].isdigit()]  # 01 ... 09
# A repository path in a notebook: lab/lora.py, tests/engine/test_batched.py, lab/data/, ...
REPO_PATH = re.compile(r"(?<![\w/.-])((?:lab|tests|benchmarks|scripts|docs|binder)/[\w./-]*[\w/])")
NOTEBOOK_FILE = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.ipynb)\b")
NOTEBOOK_NUMBER = re.compile(r"\b[Nn]otebooks? (\d{1,2})\b")
DOTTED = re.compile(r"(?<![\w/.])lab(?:\.[A-Za-z_]\w*)+")


def sources(path, kind=None):
    """(cell index, source) of every cell, or of the markdown or code cells only."""
    cells = load(path)["cells"]
    return [
        (i, "".join(c["source"])) for i, c in enumerate(cells) if kind in (None, c["cell_type"])
    ]


def resolves(name):
    """Whether a dotted name (lab.sweeps.sweep) is an importable module or attribute."""
    import importlib

    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            return False
    return True


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_every_path_module_and_notebook_a_notebook_names_exists(path):
    missing = []
    for i, source in sources(path):
        for ref in REPO_PATH.findall(source):
            if not (ROOT / ref).exists():
                missing.append(f"cell {i}: {ref}")
        for ref in NOTEBOOK_FILE.findall(source):
            if not any((base / ref).exists() for base in (path.parent, NOTEBOOKS, ROOT)):
                missing.append(f"cell {i}: {ref}")
        for n in NOTEBOOK_NUMBER.findall(source):
            if not any(p.name.startswith(f"{int(n):02d}_") for p in LESSONS):
                missing.append(f"cell {i}: notebook {n}")
    for i, source in sources(path, "markdown"):
        missing += [f"cell {i}: {name}" for name in DOTTED.findall(source) if not resolves(name)]
    assert not missing, f"{path.name} names what does not exist: {missing}"


def test_the_path_checks_catch_what_the_old_map_named():
    assert REPO_PATH.findall("| `lab/train.py` | the loop |") == ["lab/train.py"]
    assert not (ROOT / "lab/train.py").exists() and not (ROOT / "lab/sweep.py").exists()
    assert NOTEBOOK_FILE.findall("see `exercises/student.ipynb`.") == ["exercises/student.ipynb"]
    assert NOTEBOOK_NUMBER.findall("built in notebook 8; notebooks 5") == ["8", "5"]
    assert resolves("lab.sweeps.sweep") and not resolves("lab.sweep.sweep")


def the_map():
    """The markdown cell of notebook 01 headed 'The map of the lab'."""
    cells = [s for _, s in sources(NOTEBOOKS / "01_welcome.ipynb", "markdown")]
    found = [s for s in cells if s.startswith("## The map of the lab")]
    assert len(found) == 1, "notebook 01 has no cell headed '## The map of the lab'"
    return found[0]


def test_the_map_lists_every_notebook():
    listed = set(NOTEBOOK_FILE.findall(the_map()))
    missing = [i for i in IDS if i not in listed]
    assert not missing, f"notebook 01's map leaves out {missing}"


def test_the_map_names_lab_modules_and_they_exist():
    named = REPO_PATH.findall(the_map())
    assert "lab/lora.py" in named and "lab/training.py" in named
    assert all((ROOT / ref).exists() for ref in named), named


# Test machinery lives in tests/ and the repository root, not among the lessons.


def test_the_notebooks_folder_holds_only_notebooks():
    """Besides the lessons, one link: notebooks/sanitize.cfg, where nbval's sanitizer used to be
    and where a check run by hand (`--nbval-sanitize-with notebooks/sanitize.cfg`) still looks;
    it points at tests/nbval/sanitize.cfg, the one file."""
    link = NOTEBOOKS / "sanitize.cfg"
    assert link.is_symlink() and link.resolve() == SANITIZE.resolve()
    others = [
        str(p.relative_to(NOTEBOOKS))
        for p in NOTEBOOKS.rglob("*")
        if p.is_file()
        and p != link
        and p.suffix != ".ipynb"
        and not any(part.startswith(".") or part == "__pycache__" for part in p.parts)
    ]
    assert not others, f"test machinery or stray files among the lessons: {others}"


def test_one_notebook_alone_gets_the_throwaway_cache_and_the_sanitizer(tmp_path):
    """`pytest notebooks/X.ipynb`, even from inside notebooks/, runs as `pytest` does."""
    import subprocess
    import sys

    script = """
import os, pytest
class Probe:
    def pytest_collection_finish(self, session):
        print("SANITIZE", session.config.option.nbval_sanitize_with)
pytest.main(["--collect-only", "-q", "01_welcome.ipynb"], plugins=[Probe()])
print("CACHE", os.environ.get("LORA_LAB_CACHE"))
print("CALIBRATE", os.environ.get("LORA_LAB_CALIBRATE"))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_LAB_")}
    env["LORA_LAB_CACHE"] = str(tmp_path / "user-cache")  # what a user's shell might have
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=NOTEBOOKS, env=env, capture_output=True, text=True,
        timeout=120,
    ).stdout  # fmt: skip
    seen = dict(line.split(" ", 1) for line in out.splitlines() if line.split(" ")[0].isupper())
    assert Path(seen.get("SANITIZE", "")).resolve() == SANITIZE.resolve(), out[-2000:]
    assert "lora-lab-nbval-cache-" in seen.get("CACHE", ""), out[-2000:]
    assert seen.get("CALIBRATE") == "0", out[-2000:]


# Numbers a benchmark produces live in its results file: a notebook reads and prints them, and
# its prose states none (a speedup written in prose goes stale when the benchmark is rerun).
MEASURED_RATIO = re.compile(r"\d+\.\d+\s?(?:×|x\b)")  # 1.05×, 2.2x: arithmetic gives whole ones
RATIO_AT_BATCH = re.compile(r"\d+(?:\.\d+)?\s?(?:×|x\b)[^.\n]{0,80}?\bbatch(?: size)? \d+")


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_prose_states_no_measured_speedup(path):
    found = [
        f"cell {i}: {m.group(0)!r}"
        for i, source in sources(path, "markdown")
        for regex in (MEASURED_RATIO, RATIO_AT_BATCH)
        for m in regex.finditer(source)
    ]
    hint = "read it from benchmarks/results/*.json in a code cell and print it"
    assert not found, f"{path.name} quotes measured speedups in prose ({hint}): {found}"


def test_the_speedup_check_catches_the_old_sweep_sentence():
    old = "about 1.05× at batch 64, where a sweep stacks two per step, and about 2× at batch 8"
    assert MEASURED_RATIO.findall(old) == ["1.05×"]
    assert len(RATIO_AT_BATCH.findall(old)) == 2
    assert not MEASURED_RATIO.search("gradients + Adam are 3× the fp32 weights; 128 × 128")


def benchmark_cells():
    """(notebook, cell) of every code cell that reads a benchmark's results file."""
    return [
        (path, i, source)
        for path in PATHS
        for i, source in sources(path, "code")
        if "benchmarks" in source and "results" in source and ".json" in source
    ]


def test_the_benchmark_cell_finds_its_results_from_any_folder(tmp_path, monkeypatch):
    """A class copies the notebooks into each student's home: the results file is found from the
    lab package, not from the notebook's folder."""
    import contextlib
    import io

    import lab

    (path, index, source), *_ = benchmark_cells()
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, f"{path.name} cell {index}", "exec"), {"lab": lab})
    assert "x as fast" in printed.getvalue(), printed.getvalue()


def test_05_reads_the_sweep_speedups_from_the_results_file():
    cells = [(path.name, i) for path, i, source in benchmark_cells() if "sweep" in source]
    assert [name for name, _ in cells] == ["05_sweeps.ipynb"], cells


BENCHMARK_CELLS = benchmark_cells()


@pytest.mark.parametrize(
    ("path", "index", "source"),
    BENCHMARK_CELLS,
    ids=[f"{path.name}-cell-{i}" for path, i, _ in BENCHMARK_CELLS],
)
def test_a_benchmark_cell_stored_what_the_results_file_holds_now(path, index, source, monkeypatch):
    """The stored output is what the cell prints from today's results file: rerun the notebook
    (scripts/run_notebooks.py) after rerunning a benchmark."""
    import contextlib
    import io

    monkeypatch.chdir(path.parent)
    import lab

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(source, f"{path.name} cell {index}", "exec"), {"lab": lab})
    cell = load(path)["cells"][index]
    stored = "".join(
        "".join(o.get("text", "")) for o in cell["outputs"] if o["output_type"] == "stream"
    )
    assert stored == printed.getvalue()
    numbers = re.findall(r"\d+\.\d+x", stored)
    assert numbers, f"{path.name} cell {index} prints no speedup: {stored!r}"


# A promise of how long something runs names the machine it was measured on.
PROMISE = re.compile(
    r"\b(?:runs?|takes?|trains?|took|training)\b[^.;]*?"
    r"(?:\d+\s?(?:s|min)\b|\bseconds?\b|\bminutes?\b|\ba minute\b)"
)
SENTENCES = re.compile(r"(?<=[.;!?])\s+|\n\s*-\s+|\n\n")
MACHINE = re.compile(r"\b\d+-core\b")


@pytest.mark.parametrize("path", [p for p in LESSONS if int(p.name[:2]) <= 7], ids=lambda p: p.name)
def test_a_time_promise_says_what_machine_it_was_measured_on(path):
    vague = [
        sentence
        for _, source in sources(path, "markdown")
        for sentence in SENTENCES.split(source)
        if PROMISE.search(sentence) and not MACHINE.search(sentence)
    ]
    assert not vague, f"{path.name}: say what machine these were measured on: {vague}"


def test_the_promise_check_reads_the_old_promises():
    assert PROMISE.search("the two trainings take about half a minute on a laptop CPU")
    assert PROMISE.search("the code runs in seconds on a laptop CPU")
    assert not MACHINE.search("the code runs in seconds on a laptop CPU")
    assert MACHINE.search("the two trainings take about 20 s on a quiet 2-core CPU")
    assert not PROMISE.search("**Time:** about 15 minutes")  # the reader's time, not the CPU's


def test_a_notebook_the_read_only_or_the_browser_run_checks_is_not_run_twice():
    """With tests/test_readonly.py selected where it can run (root on Linux, strace, setpriv),
    its notebooks' nbval items are deselected (it checks them under strict nbval from the
    read-only copy); with tests/browser/test_lab.py selected where it can run (Playwright and a
    Chromium), so are those of the notebooks it runs in JupyterLab and compares with their
    stored outputs. Collected alone, or with those tests deselected (-m 'not browser', -k), a
    notebook keeps its items."""
    import shutil
    import subprocess
    import sys

    import test_readonly
    from needs import browser_missing

    def collected(*args: str) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        ).stdout  # fmt: skip
        items = [line.split("::")[0] for line in out.splitlines() if ".ipynb::" in line]
        return {path: items.count(path) for path in set(items)}

    read_only = list(test_readonly.NOTEBOOKS)
    assert read_only and all((ROOT / nb).is_file() for nb in read_only), read_only
    welcome = "notebooks/01_welcome.ipynb"  # run in JupyterLab by the browser test, not read-only
    other = "notebooks/dashboard.ipynb"  # run by neither
    assert welcome not in read_only and other not in read_only
    notebooks = [read_only[0], welcome, other]
    tests = ["tests/test_readonly.py", "tests/browser/test_lab.py"]
    alone = collected(*notebooks)
    assert all(alone.get(nb) for nb in notebooks), alone
    together = collected(*notebooks, *tests)
    read_only_runs = (
        sys.platform == "linux"
        and os.geteuid() == 0
        and all(shutil.which(tool) for tool in ("strace", "setpriv"))
    )
    assert (read_only[0] not in together) == read_only_runs, together
    assert (welcome not in together) == (not browser_missing()), together
    assert together.get(other) == alone[other], together
    # The browser test deselected by mark and the read-only test by keyword: all come back.
    deselected = collected(*notebooks, *tests, "-m", "not browser", "-k", "not read_only_copy")
    assert deselected == alone, deselected
