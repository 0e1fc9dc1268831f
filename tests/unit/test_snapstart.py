"""SnapStart hooks: registered only where the runtime provides snapshot_restore_py."""

import random
import sys
import types

from handler import snapstart


def test_snapstart_register_without_runtime_support_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "snapshot_restore_py", None)  # import raises ImportError
    assert snapstart.register(lambda: None) is False


def test_snapstart_register_builds_before_snapshot_and_reseeds_after_restore(monkeypatch):
    before, after = [], []
    fake = types.ModuleType("snapshot_restore_py")
    fake.register_before_snapshot = before.append
    fake.register_after_restore = after.append
    monkeypatch.setitem(sys.modules, "snapshot_restore_py", fake)

    def build():
        return "service"

    assert snapstart.register(build) is True
    assert before == [build]
    assert after == [random.seed]


def test_snapstart_after_restore_hook_gives_restored_copies_different_jitter():
    # Two environments restored from one snapshot start with the same random state; the hook reseeds.
    state = random.getstate()
    random.setstate(state)
    first = random.random()
    random.setstate(state)
    random.seed()  # what the after-restore hook runs
    assert random.random() != first
