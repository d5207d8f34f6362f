"""Kill a ledger commit just before each of its file operations and reopen the ledger
(run by tests/test_crash.py in a process of its own: ``python tests/crash_steps.py DIR``).

A base ledger holds 2 rounds of FedUGM (server momentum, client memory) on the linear
oracle. For each operation, a round commit (round 3) and a replay removal's commit (of
p1), a forked child performs it once to count its file operations (each ``os.replace``,
``os.unlink`` and ``os.fsync``) and leave the "after" ledger, then once per operation k
with ``os._exit`` just before the k-th. Each crashed ledger is reopened by a reader, which
must see exactly the "before" or the "after" state; in the "after" state of a removal no
file may hold the removed client. Prints one JSON object: per operation, the number of
crash points and how many ended before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

from flwr.app import ConfigRecord  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from helpers import LinearGrid, linear_problem, train  # noqa: E402

import fl_ugm.merge as merge_module  # noqa: E402
from fl_ugm import FedUGM  # noqa: E402
from fl_ugm.ledger import Ledger  # noqa: E402
from fl_ugm.removal import plan_removal  # noqa: E402

# children are forked: no compiled kernel's threads may run in the parent first
merge_module._merge_numba = merge_module._merge_torch
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
REMOVED = "p1"


def strategy(directory: Path) -> FedUGM:
    return FedUGM(prior_precision=0.6, min_train_nodes=3, min_available_nodes=3,
                  update_screen=None, server_lr=0.8, server_momentum=0.5, client_memory=True,
                  ledger=directory)


def round_commit(directory: Path, grid: LinearGrid, crash) -> None:
    server = strategy(directory)
    _, arrays = server.resume_from_ledger()
    replies = grid.send_and_receive(server.configure_train(1, arrays, ConfigRecord(), grid))
    crash.arm()
    server.aggregate_train(1, replies)


def removal_commit(directory: Path, grid: LinearGrid, crash) -> None:
    ledger = Ledger(directory)
    plan = plan_removal(ledger, REMOVED, recentring=1.0, shared_rank=0)
    crash.arm()
    ledger.commit_removal(REMOVED, ledger.global_state()[0] + 1, plan.state,
                          history=plan.history, records=plan.records)


class Crash:
    """Counts the file operations once armed; exits the process just before the k-th."""

    def __init__(self, at: int | None) -> None:
        self.at, self.count, self.armed = at, 0, False
        for name in ("replace", "unlink", "fsync"):
            real = getattr(os, name)
            setattr(os, name, self._counted(real))

    def arm(self) -> None:
        self.armed = True

    def _counted(self, real):
        def operation(*args, **kwargs):
            if self.armed:
                self.count += 1
                if self.count == self.at:
                    os._exit(137)  # killed: nothing after this runs
            return real(*args, **kwargs)
        return operation


def run(operation, source: Path, target: Path, grid: LinearGrid, at: int | None) -> int:
    """Copy ``source`` to ``target`` and run ``operation`` there in a forked child that dies
    before its ``at``-th file operation; the number of operations it did."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("lock"))
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(read)
        crash = Crash(at)
        operation(target, grid, crash)
        os.write(write, str(crash.count).encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(child, 0)
    done = os.read(read, 32).decode()
    os.close(read)
    if os.waitstatus_to_exitcode(status) not in (0, 137):
        raise RuntimeError(f"the child failed (status {status}) at crash point {at}")
    return int(done) if done else -1


def snapshot(directory: Path) -> dict:
    """What a reader sees: rounds, clients, removals, the history and the newest global."""
    ledger = Ledger(directory, create=False)
    _, newest = ledger.global_state()
    return {
        "rounds": ledger.rounds(), "removed": ledger.removed_clients(),
        "clients": {c: ledger.client(c).round for c in ledger.client_ids()},
        "history": [[p.client_id for p in ledger.history_round(r).participants]
                    for r in ledger.history()],
        "global": hashlib.sha256(b"".join(v.numpy().tobytes() for v in newest.values()))
        .hexdigest(),
        "state": ledger._index.get("server_state", {}).get("round"),
    }


def leftovers(directory: Path) -> list[str]:
    """Files a reader's open left in place that the index does not list."""
    index = json.loads((directory / "index.json").read_text())
    listed = {e["file"] for e in index["clients"].values()} | {
        e["file"] for e in index["globals"]} | {e["file"] for e in index.get("history", [])}
    listed |= {index[k]["file"] for k in ("server_state", "prior") if "file" in index.get(k, {})}
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name not in ("index.json", "lock")
                  and str(p.relative_to(directory)) not in listed)


def main(work: Path) -> dict:
    hessians, xty, theta0 = linear_problem(seed=71)
    grid = LinearGrid(hessians, xty)
    base = work / "base"
    train(strategy(base), grid, theta0, rounds=2)
    before = snapshot(base)
    results = {}
    for name, operation in (("round", round_commit), ("removal", removal_commit)):
        operations = run(operation, base, work / f"{name}-after", grid, at=None)
        after = snapshot(work / f"{name}-after")
        assert after != before
        ends = {"before": 0, "after": 0}
        for at in range(1, operations + 1):
            crashed = work / f"{name}-{at}"
            run(operation, base, crashed, grid, at=at)
            seen = snapshot(crashed)  # a reader's open
            end = "before" if seen == before else "after" if seen == after else None
            if end is None:
                raise AssertionError(f"{name}, crash before operation {at}: neither state "
                                     f"({seen})")
            ends[end] += 1
            if end == "after":
                assert not leftovers(crashed), (name, at, leftovers(crashed))
                if name == "removal":
                    assert not [p for p in crashed.rglob(f"{REMOVED}.*")], (at, "client file")
            Ledger(crashed).set_meta(reopened=at)  # a writer commits on it: usable
            assert snapshot(crashed) == seen and not leftovers(crashed)
            shutil.rmtree(crashed)
        results[name] = {"crash_points": operations, **ends}
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
