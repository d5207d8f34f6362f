"""A ledger commit killed just before each of its file operations leaves the ledger exactly
before or exactly after it, and after a removal's commit point none of the removed client's
files remains: tests/crash_steps.py forks one child per crash point (a round commit and a
replay removal's commit) and checks each reopened ledger; this test runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_a_commit_killed_before_any_file_operation_is_before_or_after(tmp_path):
    helper = Path(__file__).with_name("crash_steps.py")
    done = subprocess.run([sys.executable, str(helper), str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for name in ("round", "removal"):
        counts = results[name]
        # every crash point ended in one of the two states, and both occur: the commit point
        # lies inside the operations (the index's rename), not at either end
        assert counts["before"] + counts["after"] == counts["crash_points"] >= 20
        assert counts["before"] > 0 and counts["after"] > 0
