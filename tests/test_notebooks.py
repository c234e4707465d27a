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
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.rglob("*.ipynb"))
IDS = [str(p.relative_to(NOTEBOOKS)) for p in PATHS]
UNCHECKED = {"nbval-ignore-output", "nbval-skip"}
SCIENTIFIC = re.compile(r"\d(\.\d+)?e[-+]\d\d")
BARE = re.compile(r":\s*(True|False)\s*$")  # a claim printed as a boolean


def load(path):
    return json.loads(path.read_text())


def sanitizers():
    config = configparser.ConfigParser()
    assert config.read(NOTEBOOKS / "sanitize.cfg"), "notebooks/sanitize.cfg is missing"
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
    assert {"exercises/student.ipynb", "exercises/solutions.ipynb"} <= set(IDS)


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
