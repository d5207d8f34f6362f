"""The ledger's storage contract (``fl_ugm.storage``, docs/design.md §5): one writer, nothing
lost, nothing kept that a removal forgot. Each test reproduces a defect of the review."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import LinearGrid, linear_problem, new_strategy, train

from fl_ugm import FedUGM
from fl_ugm.cli import main as cli_main
from fl_ugm.engine import ServerState
from fl_ugm.ledger import Ledger, LedgerCorruptError, LedgerMismatchError
from fl_ugm.storage import LedgerLockedError

pytestmark = pytest.mark.usefixtures("server_identity")


def trained(tmp_path, rounds: int = 2):
    hessians, xty, theta0 = linear_problem(seed=61)
    grid = LinearGrid(hessians, xty)
    train(new_strategy(tmp_path), grid, theta0, rounds=rounds)
    return grid


def files(directory) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_a_lost_index_is_refused_with_the_recovery_step_and_nothing_is_deleted(tmp_path):
    trained(tmp_path)
    before = files(tmp_path) - {"index.json"}
    (tmp_path / "index.json").unlink()
    for opening in (lambda: FedUGM(ledger=tmp_path), lambda: Ledger(tmp_path),
                    lambda: Ledger(tmp_path, create=False)):
        with pytest.raises(LedgerCorruptError, match=r"holds ledger data files but no "
                           r"index\.json: the index was lost or deleted\. Restore the "
                           r"directory from a backup"):
            opening()
    assert files(tmp_path) == before  # 8 data files, as they were


def test_a_second_writing_process_is_refused_with_the_holders_pid(tmp_path):
    trained(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from fl_ugm.ledger import Ledger
        ledger = Ledger({str(tmp_path)!r})
        ledger.lock()
        print("locked", flush=True)
        sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        script = textwrap.dedent(f"""
            from fl_ugm.ledger import Ledger
            from fl_ugm.storage import LedgerLockedError
            try:
                Ledger({str(tmp_path)!r}).lock()
            except LedgerLockedError as err:
                print(err)
            """)
        refused = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                 text=True, check=True).stdout
        assert f"is being written by process {holder.pid}" in refused
        out = tmp_path.parent / "without.safetensors"
        code = subprocess.run([sys.executable, "-m", "fl_ugm.cli", "remove", "--ledger",
                               str(tmp_path), "--client", "p1", "--out", str(out), "--forget"],
                              capture_output=True, text=True)
        assert code.returncode == 2 and f"process {holder.pid}" in code.stderr
        assert Ledger(tmp_path, create=False).client_ids() == ["p0", "p1", "p2"]
    finally:
        holder.communicate("done\n", timeout=60)
    Ledger(tmp_path).lock()  # released with its process


def test_an_object_whose_view_is_stale_may_not_commit(tmp_path):
    trained(tmp_path)
    stale, fresh = Ledger(tmp_path), Ledger(tmp_path)
    fresh.set_meta(note="written")
    with pytest.raises(LedgerLockedError, match="changed since this object read it"):
        stale.set_meta(other="lost")
    assert Ledger(tmp_path).meta["note"] == "written" and "other" not in Ledger(tmp_path).meta


def test_a_rewritten_global_gets_a_new_file_and_the_old_one_is_never_touched(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.record_global(1, {"w": torch.zeros(3)})
    (first,) = (tmp_path / "globals").iterdir()
    content = first.read_bytes()
    ledger.record_global(1, {"w": torch.ones(3)})  # the same round again
    (second,) = (tmp_path / "globals").iterdir()
    assert second.name != first.name and not first.exists()
    assert torch.equal(Ledger(tmp_path).global_state(1)[1]["w"], torch.ones(3))
    assert content  # the first file was replaced by a new name, never rewritten in place


def test_renames_are_made_durable_before_the_index_and_the_index_before_deletes(
        tmp_path, monkeypatch):
    import fl_ugm.storage as storage

    events = []
    real_replace, real_unlink, real_sync = os.replace, os.unlink, storage._fsync_folder
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", str(b)))
                        or real_replace(a, b))
    monkeypatch.setattr(os, "unlink", lambda p, **k: events.append(("unlink", str(p)))
                        or real_unlink(p, **k))
    monkeypatch.setattr(storage, "_fsync_folder", lambda folder: events.append(
        ("sync", str(folder))) or real_sync(folder))
    ledger = Ledger(tmp_path)
    ledger.record_global(1, {"w": torch.zeros(3)})
    events.clear()
    ledger.record_global(1, {"w": torch.ones(3)})
    kinds = [(kind, os.path.basename(path)) for kind, path in events]
    index = kinds.index(("rename", "index.json"))
    assert kinds[index - 1] == ("sync", "globals")  # the data file's rename, durable first
    assert kinds[index + 1] == ("sync", tmp_path.name)  # then the index's
    assert [k for k, _ in kinds[index + 2:]] == ["unlink"]  # the superseded file, last


def test_a_failed_index_write_rolls_memory_back_so_a_retried_round_counts_once(
        tmp_path, monkeypatch):
    import fl_ugm.storage as storage

    hessians, xty, theta0 = linear_problem(seed=62)
    grid = LinearGrid(hessians, xty)
    strategy = new_strategy(tmp_path)
    theta = train(strategy, grid, theta0, rounds=1)
    applied = Ledger(tmp_path).client("p0").applied["w"].clone()
    real = storage.write_atomically

    def disk_full(path, write, **kwargs):
        if path.name == "index.json":
            raise OSError("No space left on device")
        return real(path, write, **kwargs)

    from flwr.app import ArrayRecord, ConfigRecord
    messages = strategy.configure_train(2, ArrayRecord({"w": theta}), ConfigRecord(), grid)
    replies = grid.send_and_receive(messages)
    monkeypatch.setattr(storage, "write_atomically", disk_full)
    with pytest.raises(OSError, match="No space left"):
        strategy.aggregate_train(2, replies)
    monkeypatch.undo()
    assert strategy.ledger.client("p0").round == 1  # memory as the disk
    torch.testing.assert_close(strategy.ledger.client("p0").applied["w"], applied)
    strategy.aggregate_train(2, replies)  # the retry
    once = Ledger(tmp_path).client("p0").applied["w"]
    reference = new_strategy(tmp_path / "reference")
    train(reference, grid, theta0, rounds=2)
    torch.testing.assert_close(once, Ledger(tmp_path / "reference").client("p0").applied["w"],
                               rtol=0, atol=1e-12)


def test_paths_in_the_index_must_lie_inside_the_ledger(tmp_path):
    trained(tmp_path)
    outside = tmp_path.parent / "x.safetensors"
    outside.write_bytes(b"keep me")
    index = json.loads((tmp_path / "index.json").read_text())
    index["clients"]["p1"]["file"] = "../x.safetensors"
    index["superseded"] = ["../x.safetensors"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LedgerCorruptError, match=r"names the file '\.\./x\.safetensors', which "
                       r"is not a ledger file name inside the directory"):
        Ledger(tmp_path, create=False)
    assert outside.read_bytes() == b"keep me"


def test_cli_out_inside_the_ledger_and_bad_values_exit_2(tmp_path, capsys):
    trained(tmp_path)
    index = (tmp_path / "index.json").read_text()
    for argv, message in (
            (["--out", str(tmp_path / "index.json")], "lies inside the ledger"),
            (["--out", str(tmp_path / "globals" / "x.safetensors")], "lies inside the ledger"),
            (["--out", str(tmp_path.parent / "o.safetensors"), "--prior-precision", "nan"],
             "prior_precision=nan"),
            (["--out", str(tmp_path.parent / "o.safetensors"), "--prior-precision", "0"],
             "prior_precision=0.0"),
            (["--out", "/proc/forbidden/o.safetensors"], "fl-ugm remove:")):
        code = cli_main(["remove", "--ledger", str(tmp_path), "--client", "p1", "--forget",
                         *argv])
        assert code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "index.json").read_text() == index


def test_the_history_settings_are_recorded_when_the_ledger_is_created(tmp_path):
    FedUGM(ledger=tmp_path)
    assert Ledger(tmp_path).meta["history_rounds"] == 0
    with pytest.raises(LedgerMismatchError, match="history_rounds: stored 0, asked 1"):
        Ledger(tmp_path, history_rounds=1)


def test_forget_deletes_every_state_trained_with_the_client_and_reports_it(tmp_path, capsys):
    grid = trained(tmp_path, rounds=3)
    client_file = Ledger(tmp_path)._index["clients"]["p1"]["file"]
    old_globals = [e["file"] for e in Ledger(tmp_path)._index["globals"]]
    assert cli_main(["remove", "--ledger", str(tmp_path), "--client", "p1", "--out",
                     str(tmp_path.parent / "out.safetensors"), "--forget"]) == 0
    out = tmp_path.parent / "out.safetensors.report.json"
    report = json.loads(out.read_text())
    assert set(report["deleted_files"]) >= {client_file, *old_globals}
    printed = capsys.readouterr().out
    assert f"{len(report['deleted_files'])} files trained with the client deleted" in printed
    # a replay of 3 rounds: the rounds after p1's first rest on estimates, and it says so
    assert report["estimated_rounds"] == [2, 3]
    assert "unverified: 2 replayed rounds rest on re-centred estimates" in printed
    left = files(tmp_path)
    assert not left & {client_file, *old_globals}
    ledger = Ledger(tmp_path)
    assert ledger.rounds() == [4] and "p1" not in ledger.nodes()
    assert all("p1" not in [p.client_id for p in ledger.history_round(r).participants]
               for r in ledger.history())
    assert not any("p1" in name for name in left)
    del grid


def test_deletions_interrupted_after_the_commit_are_finished_by_the_next_reader(
        tmp_path, monkeypatch):
    trained(tmp_path)
    ledger = Ledger(tmp_path)
    client_file = ledger._index["clients"]["p1"]["file"]
    monkeypatch.setattr(os, "unlink", lambda *a, **k: (_ for _ in ()).throw(SystemExit(9)))
    with pytest.raises(SystemExit):  # killed right after the removal's commit point
        ledger.commit_removal("p1", 3, ServerState(ledger.global_state()[1]))
    monkeypatch.undo()
    assert (tmp_path / client_file).exists()
    reader = Ledger(tmp_path, create=False)  # any reader finishes the committed deletions
    assert not (tmp_path / client_file).exists() and reader.removed_clients() == {"p1": 3}
