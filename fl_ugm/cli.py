"""The ``fl-ugm`` command line: ``fl-ugm remove --ledger DIR --client ID --out FILE``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from fl_ugm.ledger import Ledger, LedgerError, write_atomically
from fl_ugm.removal import RECENTRING, REMOVAL_METHODS, SHARED_RANK, plan_removal


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-ugm", description="fl_ugm tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    remove = commands.add_parser(
        "remove",
        help="remove a client's contribution from the newest global in a ledger (offline)",
        description="Remove one client using only the ledger (see fl_ugm.removal): "
        "--method replay (default) recomputes the training without it from the ledger's "
        "per-round history; --method eq13 applies the one-round update (Eq. 13, plus "
        "reverting the coordinates no remaining client informs). Writes the new global state "
        "(safetensors) and a JSON report. The ledger itself is left unchanged unless --forget "
        "is given. For online removal and repair rounds inside a running Flower app, use "
        "FedUGM.remove (the app's remove-client run config).",
    )
    remove.add_argument("--ledger", required=True, type=Path, help="ledger directory")
    remove.add_argument("--client", required=True, help="stable client id to remove")
    remove.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    remove.add_argument("--method", choices=REMOVAL_METHODS, default="replay",
                        help="replay (default) or eq13")
    remove.add_argument("--recentring", type=float, default=RECENTRING,
                        help="replay: κ, the re-centring prior as a fraction of H0 (1: the "
                        f"derivation, exact for linear regression; default {RECENTRING:g}, "
                        "measured on nets)")
    remove.add_argument("--shared-rank", type=int, default=SHARED_RANK,
                        help="replay: rank of the other clients' update subspace per row; the "
                        "removed client's update outside it is not re-centred (0: off; "
                        f"default {SHARED_RANK})")
    remove.add_argument("--approximate", action="store_true",
                        help="replay: if the history does not reach back to the client's "
                        "first round, replay the stored rounds only (the report says so) "
                        "instead of refusing")
    remove.add_argument("--prior-precision", type=float, default=None,
                        help="H0; default: the run's, from the δ and merge rule stored in the "
                        "ledger")
    remove.add_argument("--no-recenter", action="store_true",
                        help="eq13: use the stored delta as is (no re-centring to the current "
                        "model)")
    remove.add_argument("--eq13-only", action="store_true",
                        help="eq13: do not revert the coordinates no remaining client informs")
    remove.add_argument("--forget", action="store_true",
                        help="also commit the removal to the ledger, in one step: the result "
                        "becomes its next global (a replay also stores its rewritten "
                        "history), the client's record is deleted and the client is listed as "
                        "removed (never sampled or recorded again by a FedUGM run that "
                        "resumes on this ledger)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fl-ugm remove: %(message)s")

    try:
        ledger = Ledger(args.ledger, create=False)
        if args.out.resolve().is_relative_to(args.ledger.resolve()):
            raise LedgerError(f"--out {args.out} lies inside the ledger {args.ledger}; write "
                              "the result outside it (the ledger's files are its own).")
        if args.forget:
            ledger.lock()  # one writer: refused now if a server writes this ledger
        plan = plan_removal(ledger, args.client, method=args.method,
                            prior_precision=args.prior_precision, recentring=args.recentring,
                            shared_rank=args.shared_rank,
                            approximate=args.approximate,
                            recenter=not args.no_recenter, revert_uninformed=not args.eq13_only)
        write_atomically(args.out, lambda tmp: save_file(
            {k: v.contiguous() for k, v in plan.state.global_state.items()}, str(tmp)))
        if args.forget:
            plan.report["deleted_files"] = ledger.commit_removal(
                args.client, plan.report["global_round"] + 1, plan.state,
                history=plan.history, records=plan.records)
        report_path = args.out.with_suffix(args.out.suffix + ".report.json")
        write_atomically(report_path, lambda tmp: tmp.write_text(
            json.dumps(plan.report, indent=2)))
    except (LedgerError, ValueError, OSError) as err:  # a bad value or path, too
        print(f"fl-ugm remove: {err}", file=sys.stderr)
        return 2
    print(summary(plan.report, args.out, report_path, forgotten=args.forget))
    return 0


def summary(report: dict, out: Path, report_path: Path, *, forgotten: bool) -> str:
    """What a removal did, in a few lines (the whole report is in ``report_path``)."""
    how = report["method"]
    if "replayed_from_round" in report:
        first, last = report["replayed_from_round"], report["replayed_to_round"]
        how += f" of rounds {first} to {last} ({last - first + 1} rounds"
        how += ", approximate: the history starts after the client's first round)" if report[
            "approximate"] else ")"
    lines = [f"removed client {report['client']!r} from the global of round "
             f"{report['global_round']} ({how}); the update moved it by "
             f"{report['update_l2_norm']:.4g} (L2)",
             f"new global: {out}", f"report: {report_path}"]
    if report.get("estimated_rounds"):
        lines.insert(1, f"unverified: {len(report['estimated_rounds'])} replayed rounds rest on "
                        "re-centred estimates (no client retrained them; a running app can "
                        "correct them: FedUGM.remove(mode='online', correction_budget=N))")
    if forgotten:
        lines.append(f"ledger: committed as round {report['global_round'] + 1}; "
                     f"{len(report['deleted_files'])} files trained with the client deleted")
    else:
        lines.append("ledger: unchanged (--forget commits the removal to it)")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
