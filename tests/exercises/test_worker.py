"""Tests for lab/exercises/worker.py: what a submission rebinds is seen, and put back."""

from __future__ import annotations

import sys
import types

from lab.exercises import worker


def _module(monkeypatch, name: str = "lab_watched_stand_in") -> types.ModuleType:
    module = types.ModuleType(name)
    module.keep, module.swap, module.gone = 1, 2, 3
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_rebound_added_and_deleted_names_are_reported_and_submodules_are_not(monkeypatch):
    module = _module(monkeypatch)
    modules = {module.__name__: module}
    before = worker._snapshot(modules)
    module.swap, module.added, module.sub = 20, 4, types.ModuleType("imported_on_first_use")
    del module.gone
    name = module.__name__
    assert worker._changes(modules, before) == [f"{name}.added", f"{name}.gone", f"{name}.swap"]


def test_a_module_replaced_in_sys_modules_is_reported(monkeypatch):
    module = _module(monkeypatch)
    modules = {module.__name__: module}
    before = worker._snapshot(modules)
    monkeypatch.setitem(sys.modules, module.__name__, types.ModuleType("fake"))
    assert worker._changes(modules, before) == [f"sys.modules[{module.__name__!r}]"]


def test_the_clean_world_is_put_back_and_the_submissions_given_back(monkeypatch):
    module = _module(monkeypatch)
    world = worker._World({module.__name__: module})
    module.swap, module.added = 20, 4  # what the submission did
    saved = world.put_back()  # the worker's own work runs with the module as it was
    assert module.swap == 2 and module.keep == 1
    world.give_back(saved)  # and the submission's code with what it made
    assert module.swap == 20 and module.added == 4
