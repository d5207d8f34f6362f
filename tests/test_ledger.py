"""The on-disk ledger (atomic writes, corruption, retention, ids), offline removal through it
(exact on the linear-regression oracle), and the ``fl-ugm remove`` command."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from fl_ugm.cli import main as cli_main
from fl_ugm.engine import ServerState
from fl_ugm.ledger import Ledger, LedgerCorruptError, LedgerError
from fl_ugm.merge import ugm_merge
from fl_ugm.removal import remove_from_ledger

EQ13 = ["remove", "--method", "eq13"]  # the ledgers here are written without history


def stems(folder) -> list[str]:
    """A folder's data files, without the serial and extension every file name carries."""
    return sorted(re.sub(r"\.s\d{6}\.safetensors$", "", p.name) for p in folder.iterdir())


def contribution(seed: int):
    gen = torch.Generator().manual_seed(seed)
    delta = {"w": torch.randn(3, 2, generator=gen), "running": torch.randn(2, generator=gen)}
    fisher = {"w": torch.rand(3, 2, generator=gen)}
    return delta, fisher


def test_round_trip_retention_and_disk_usage(tmp_path):
    ledger = Ledger(tmp_path, keep_globals=2)
    delta, fisher = contribution(0)
    ledger.record_client("client-7", round_=3, delta=delta, fisher=fisher, num_examples=40,
                         alpha=0.4)
    for r in range(5):
        ledger.record_global(r, {"w": torch.full((3, 2), float(r))})

    reopened = Ledger(tmp_path, keep_globals=2)
    record = reopened.client("client-7")
    assert (record.round, record.num_examples, record.alpha) == (3, 40.0, 0.4)
    assert torch.equal(record.delta["w"], delta["w"]) and set(record.fisher) == {"w"}
    assert reopened.rounds() == [3, 4]
    assert stems(tmp_path / "globals") == ["round-000003", "round-000004"]
    assert reopened.global_state()[0] == 4
    assert torch.equal(reopened.global_state(3)[1]["w"], torch.full((3, 2), 3.0))
    files = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert reopened.disk_usage() == files > 0
    with pytest.raises(LedgerError, match=r"no global checkpoint for round 1; kept: \[3, 4\]"):
        reopened.global_state(1)


def test_crash_during_write_leaves_the_previous_state(tmp_path, monkeypatch):
    ledger = Ledger(tmp_path)
    old_delta, fisher = contribution(1)
    ledger.record_client("a", round_=1, delta=old_delta, fisher=fisher, num_examples=5, alpha=1)
    index_before = (tmp_path / "index.json").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    new_delta, _ = contribution(2)
    with pytest.raises(OSError, match="disk full"):
        ledger.record_client("a", round_=2, delta=new_delta, fisher=fisher, num_examples=5,
                             alpha=1)
    monkeypatch.undo()
    assert (tmp_path / "index.json").read_bytes() == index_before
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind
    assert torch.equal(Ledger(tmp_path).client("a").delta["w"], old_delta["w"])


def test_corruption_is_reported_with_the_file(tmp_path):
    ledger = Ledger(tmp_path)
    delta, fisher = contribution(3)
    ledger.record_client("a", round_=1, delta=delta, fisher=fisher, num_examples=5, alpha=1)
    (path,) = (tmp_path / "clients").glob("a.r000001.*")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerCorruptError,
                       match=r"a\.r000001\.s\d{6}\.safetensors: checksum mismatch"):
        Ledger(tmp_path).client("a")
    path.unlink()
    with pytest.raises(LedgerCorruptError, match="listed in the index but missing"):
        Ledger(tmp_path).client("a")
    (tmp_path / "index.json").write_text('{"version": 1, "clients": {')
    with pytest.raises(LedgerCorruptError, match=r"index\.json is not valid JSON"):
        Ledger(tmp_path)


def test_a_batch_commits_all_or_nothing_and_leftovers_are_cleaned(tmp_path):
    """A round is one commit: an exception (or a crash) inside ``batch`` leaves the ledger
    at the previous round; the files it wrote are deleted by the next writer's commit."""
    ledger = Ledger(tmp_path)
    delta, fisher = contribution(5)
    with ledger.batch():
        ledger.record_client("a", round_=1, delta=delta, fisher=fisher, num_examples=5, alpha=1)
        ledger.record_global(1, {"w": torch.zeros(3, 2)})
    index = (tmp_path / "index.json").read_text()
    with pytest.raises(RuntimeError, match="crash"), ledger.batch():
        ledger.record_client("a", round_=2, delta=delta, fisher=fisher, num_examples=5, alpha=1)
        ledger.record_client("b", round_=2, delta=delta, fisher=fisher, num_examples=5, alpha=1)
        assert (tmp_path / "index.json").read_text() == index  # nothing committed yet
        raise RuntimeError("crash")
    assert (tmp_path / "index.json").read_text() == index
    assert ledger.client_ids() == ["a"] and ledger.client("a").round == 1
    assert "b.r000002" in stems(tmp_path / "clients")  # an orphan, for now
    (tmp_path / "leftover.tmp").write_text("partial")
    reopened = Ledger(tmp_path)  # a reader: touches nothing
    assert reopened.client("a").round == 1 and reopened.rounds() == [1]
    assert (tmp_path / "leftover.tmp").exists()
    # a writer's first commit; a later round also supersedes the client's file
    reopened.record_client("a", round_=3, delta=delta, fisher=fisher, num_examples=5, alpha=1)
    assert stems(tmp_path / "clients") == ["a.r000003"]
    assert not (tmp_path / "leftover.tmp").exists()


def test_bad_ids_and_arguments(tmp_path):
    ledger = Ledger(tmp_path)
    delta, fisher = contribution(4)
    with pytest.raises(LedgerError, match="must be 1-128 letters, digits"):
        ledger.record_client("../evil", round_=1, delta=delta, fisher=fisher, num_examples=1,
                             alpha=1)
    ledger.record_client("a", round_=1, delta=delta, fisher=fisher, num_examples=1, alpha=1)
    with pytest.raises(LedgerError, match=r"unknown client id 'b'; the ledger has: a"):
        ledger.client("b")
    with pytest.raises(LedgerError, match="keep_globals must be ≥ 1"):
        Ledger(tmp_path, keep_globals=0)
    with pytest.raises(LedgerError, match="holds no global checkpoint"):
        ledger.global_state()


def linear_run(tmp_path, alphas=(0.2, 0.5, 0.3), h0=0.4, seed=0):
    """One-shot UGM on linear regression with diagonal XᵀX, recorded in a ledger as a
    strategy would: the start global (round 0), each client's Δ and F (round 1), the merge."""
    gen = torch.Generator().manual_seed(seed)
    dim = 5
    theta0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    ledger = Ledger(tmp_path)
    ledger.set_meta(prior_precision=h0)
    ledger.record_global(0, {"w": theta0})
    hessians, xty, deltas = [], [], []
    for t, alpha in enumerate(alphas):
        rows = 12 + 3 * t
        q, _ = torch.linalg.qr(torch.randn(rows, dim, generator=gen, dtype=torch.float64))
        x = q * (0.3 + 2 * torch.rand(dim, generator=gen, dtype=torch.float64))
        y = torch.randn(rows, generator=gen, dtype=torch.float64)
        h, b = (x * x).sum(0), x.T @ y
        delta = (h0 * theta0 + b) / (h0 + h) - theta0
        hessians.append(h)
        xty.append(b)
        deltas.append({"w": delta})
        ledger.record_client(f"c{t}", round_=1, delta={"w": delta}, fisher={"w": h},
                             num_examples=rows, alpha=alpha)
    merged = ugm_merge({"w": theta0}, deltas, [{"w": h} for h in hessians], alphas=list(alphas),
                       prior_precision=h0)
    ledger.record_global(1, merged)

    def retrain(without: int) -> torch.Tensor:
        keep = [t for t in range(len(alphas)) if t != without]
        num = h0 * theta0 + sum(alphas[t] * xty[t] for t in keep)
        return num / (h0 + sum(alphas[t] * hessians[t] for t in keep))

    return ledger, merged, retrain


@pytest.mark.parametrize("removed", [0, 1, 2])
def test_offline_removal_through_the_ledger_is_exact_for_linear_regression(tmp_path, removed):
    ledger, merged, retrain = linear_run(tmp_path)
    state, report = remove_from_ledger(ledger, f"c{removed}", method="eq13")
    torch.testing.assert_close(state["w"], retrain(removed), rtol=0, atol=1e-10)
    assert report["recentered"] and report["client"] == f"c{removed}"
    assert (retrain(removed) - merged["w"]).abs().max() > 1e-2  # removal did something
    # without re-centring the stored delta (taken from θ0, not θ) it is only approximate
    plain, report = remove_from_ledger(ledger, f"c{removed}", method="eq13", recenter=False)
    assert not report["recentered"]
    assert (plain["w"] - retrain(removed)).abs().max() > 1e-4


def test_removal_errors_change_nothing(tmp_path):
    ledger, _, _ = linear_run(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(LedgerError, match="unknown client id 'zz'"):
        remove_from_ledger(ledger, "zz", method="eq13")
    ledger.record_client("odd", round_=1, delta={"w": torch.zeros(7)}, fisher={"w": torch.ones(7)},
                         num_examples=3, alpha=0.1)
    with pytest.raises(LedgerError, match=r"delta\['w'\] is shaped differently.*mixes models"):
        remove_from_ledger(ledger, "c0", method="eq13")
    ledger.forget_client("odd")
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    index = tmp_path / "index.json"
    assert {p: d for p, d in after.items() if p != index} == {
        p: d for p, d in before.items() if p != index}
    bookkeeping = ("commit", "serial", "superseded")  # counters, and the odd file deleted
    assert ({k: v for k, v in json.loads(after[index]).items() if k not in bookkeeping}
            == {k: v for k, v in json.loads(before[index]).items() if k not in bookkeeping})
    with pytest.raises(LedgerError, match="holds no client contributions"):
        remove_from_ledger(Ledger(tmp_path / "empty"), "c0", method="eq13", prior_precision=1.0)


def test_cli_remove_writes_model_and_report(tmp_path, capsys):
    _, _, retrain = linear_run(tmp_path / "ledger")
    out = tmp_path / "out" / "without-c1.safetensors"
    assert cli_main([*EQ13, "--ledger", str(tmp_path / "ledger"), "--client", "c1",
                     "--out", str(out)]) == 0
    torch.testing.assert_close(load_file(str(out))["w"], retrain(1), rtol=0, atol=1e-10)
    report = json.loads(out.with_suffix(".safetensors.report.json").read_text())
    assert report["client"] == "c1" and report["remaining_clients"] == ["c0", "c2"]
    printed = capsys.readouterr().out  # a summary; the report is in its own file
    assert f"removed client 'c1' from the global of round {report['global_round']}" in printed
    assert f"new global: {out}" in printed and "ledger: unchanged" in printed
    assert Ledger(tmp_path / "ledger").client_ids() == ["c0", "c1", "c2"]  # no --forget

    missing = tmp_path / "out" / "nothing.safetensors"
    assert cli_main([*EQ13, "--ledger", str(tmp_path / "ledger"), "--client", "nope",
                     "--out", str(missing)]) == 2
    assert "unknown client id 'nope'" in capsys.readouterr().err
    assert not missing.exists()
    assert cli_main([*EQ13, "--ledger", str(tmp_path / "nowhere"), "--client", "c1",
                     "--out", str(missing)]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()  # a reader creates nothing
    assert cli_main([*EQ13, "--ledger", str(tmp_path / "out"), "--client", "c1",
                     "--out", str(missing)]) == 2
    assert "out is not an fl_ugm ledger (it has no index.json)" in capsys.readouterr().err

    before = Ledger(tmp_path / "ledger").rounds()[-1]
    assert cli_main([*EQ13, "--ledger", str(tmp_path / "ledger"), "--client", "c1",
                     "--out", str(out), "--forget"]) == 0
    assert f"ledger: committed as round {before + 1}; " in capsys.readouterr().out
    ledger = Ledger(tmp_path / "ledger")
    assert ledger.client_ids() == ["c0", "c2"]
    assert ledger.removed_clients() == {"c1": before + 1}  # one commit with the new global
    round_, state = ledger.global_state()  # the ledger's newest global is the result
    assert round_ == before + 1 and torch.equal(state["w"], load_file(str(out))["w"])
    assert cli_main([*EQ13, "--ledger", str(tmp_path / "ledger"), "--client", "c1",
                     "--out", str(missing)]) == 2
    assert "client 'c1' was already removed from this ledger" in capsys.readouterr().err


def test_a_removal_is_one_commit_before_or_after_never_between(tmp_path, monkeypatch):
    """commit_removal writes the new global, deletes the record and lists the client as
    removed in one commit: a failure between the steps leaves the ledger as it was."""
    ledger, _, retrain = linear_run(tmp_path)
    index = (tmp_path / "index.json").read_text()
    state, _ = remove_from_ledger(ledger, "c1", method="eq13")

    def fail(self, client_id):
        raise OSError("crash between the new global and the deleted record")

    monkeypatch.setattr(Ledger, "forget_client", fail)
    with pytest.raises(OSError, match="crash between"):
        ledger.commit_removal("c1", 2, ServerState(state))
    monkeypatch.undo()
    assert (tmp_path / "index.json").read_text() == index
    for reopened in (ledger, Ledger(tmp_path)):  # in memory and on disk: before
        assert reopened.client_ids() == ["c0", "c1", "c2"] and reopened.removed_clients() == {}
        assert reopened.rounds() == [0, 1]
    # then the same removal without the failure: after, all three steps at once
    ledger.commit_removal("c1", 2, ServerState(state))
    reopened = Ledger(tmp_path)
    assert reopened.client_ids() == ["c0", "c2"] and reopened.removed_clients() == {"c1": 2}
    torch.testing.assert_close(reopened.global_state()[1]["w"], retrain(1), rtol=0, atol=1e-10)
    assert stems(tmp_path / "clients") == ["c0.r000001", "c2.r000001"]  # the orphan is gone
    with pytest.raises(LedgerError, match=r"client 'c1' was already removed from this ledger "
                       r"\(by the global of round 2\)"):
        remove_from_ledger(reopened, "c1", method="eq13")
    delta, fisher = contribution(0)
    with pytest.raises(LedgerError, match="'c1' was removed from this run; its contributions"):
        reopened.record_client("c1", round_=3, delta=delta, fisher=fisher, num_examples=1,
                               alpha=1)


def test_set_meta_commits_with_its_batch(tmp_path):
    ledger = Ledger(tmp_path)
    ledger.set_meta(prior_precision=1.0)
    index = (tmp_path / "index.json").read_text()
    with pytest.raises(RuntimeError, match="crash"), ledger.batch():
        ledger.set_meta(merge="ugm")
        assert (tmp_path / "index.json").read_text() == index  # not written yet
        raise RuntimeError("crash")
    history = {"history_rounds": 0, "history_dtype": "as-sent"}  # stored at creation
    assert Ledger(tmp_path).meta == {"prior_precision": 1.0, **history} == ledger.meta
    with ledger.batch():
        ledger.set_meta(merge="ugm")
    assert Ledger(tmp_path).meta == {"prior_precision": 1.0, "merge": "ugm", **history}


def test_a_ledger_refuses_a_run_with_other_settings_or_another_model(tmp_path):
    from fl_ugm import FedUGM
    from fl_ugm.ledger import LedgerMismatchError

    FedUGM(server_momentum=0.0, prior_precision=1.0, ledger=tmp_path)
    meta = Ledger(tmp_path).meta
    assert meta == {"prior_precision": 1.0, "alpha": "num-examples", "scale": 1.0,
                    "merge": "ugm", "server_lr": 1.0, "server_momentum": 0.0,
                    "server_optimizer": "momentum", "client_memory": False,
                    "carried_precision": 0.0, "history_rounds": 0, "history_dtype": "as-sent"}
    FedUGM(server_momentum=0.0, prior_precision=1.0, ledger=tmp_path)  # the same settings: accepted
    with pytest.raises(LedgerMismatchError, match=r"client_memory: stored False, this run True"):
        FedUGM(server_momentum=0.0, prior_precision=1.0, client_memory=True, ledger=tmp_path)
    with pytest.raises(LedgerMismatchError, match=r"server_momentum: stored 0\.0, this run 0\.9"):
        FedUGM(prior_precision=1.0, server_momentum=0.9, ledger=tmp_path)
    with pytest.raises(LedgerMismatchError, match=r"other settings \(prior_precision: stored "
                       r"1\.0, this run 10\.0; merge: stored 'ugm', this run "
                       r"'fisher-averaging'\)\. Run with the stored settings"):
        FedUGM(server_momentum=0.0, prior_precision=10.0, merge="fisher-averaging", ledger=tmp_path)
    assert Ledger(tmp_path).meta == meta  # nothing overwritten

    ledger = Ledger(tmp_path)
    ledger.record_global(0, {"w": torch.zeros(3), "b": torch.zeros(2)})
    with pytest.raises(LedgerMismatchError, match=r"different model than this run's global "
                       r"\(missing: \['b'\], unexpected: \[\], other shape or dtype: \['w'\]\)"):
        ledger.record_global(1, {"w": torch.zeros(4)})
    assert Ledger(tmp_path).rounds() == [0]


def test_corrupt_files_say_how_to_recover_and_what_they_block(tmp_path):
    linear_run(tmp_path)
    (path,) = (tmp_path / "clients").glob("c2.r000001.*")
    path.write_bytes(path.read_bytes()[:-1] + b"!")
    with pytest.raises(LedgerCorruptError, match=r"removing client 'c0' needs the stored Fisher "
                       r"of every remaining client, and client 'c2''s record cannot be read: "
                       r".*checksum mismatch.*Restore the ledger directory from a backup"):
        remove_from_ledger(Ledger(tmp_path), "c0", method="eq13")


def test_removal_needs_a_fisher_weighted_rule(tmp_path):
    ledger, _, _ = linear_run(tmp_path)
    ledger.set_meta(merge="task-arithmetic")
    with pytest.raises(LedgerError, match="merged with 'task-arithmetic'; client removal needs "
                       "a Fisher-weighted rule"):
        remove_from_ledger(ledger, "c0", method="eq13")
    ledger.set_meta(merge="fisher-averaging")  # H0 → 0: removes with the rule's own prior
    _, report = remove_from_ledger(ledger, "c0", method="eq13")
    assert report["prior_precision"] == pytest.approx(1e-12)
