"""Remove a client's contribution from the global model using the ledger (offline removal).

θ₋t = θ − α_t (H0 + F_t) / (H0 + Σ_{s≠t} α_s F_s) · Δ_t            (appendix Eq. 13)

Offline, Δ_t is the client's last stored delta, taken from the global θ_start it started
from, not from the current θ. By default it is re-centred to the current model with the
same quadratic model the derivation uses (ℓ_t's Hessian ≈ F_t):

    Δ'_t = Δ_t − F_t / (H0 + F_t) · (θ − θ_start)

so that (H0 + F_t)·Δ'_t is what a client fine-tuning from θ would give for a quadratic loss:
for linear regression the offline removal is then exact, like the online one. It needs the
checkpoint of the round before the client's contribution; without it the plain Δ_t is used
and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fl_ugm.ledger import Ledger, LedgerError
from fl_ugm.merge import PriorPrecision, prior_at, remove_client


def remove_from_ledger(
    ledger: Ledger,
    client_id: str,
    *,
    prior_precision: PriorPrecision | None = None,
    recenter: bool = True,
) -> tuple[dict[str, Tensor], dict]:
    """(new global state, report) after removing ``client_id`` from the newest checkpoint.

    ``prior_precision`` defaults to the ledger's stored ``meta["prior_precision"]``. Nothing
    on disk changes: the caller decides whether to save the result and forget the client.
    """
    if prior_precision is None:
        if "prior_precision" not in ledger.meta:
            raise LedgerError("no prior precision given and none stored in the ledger's meta; "
                              "pass the δ the run used.")
        prior_precision = float(ledger.meta["prior_precision"])
    if not ledger.client_ids():
        raise LedgerError(f"the ledger at {ledger.directory} holds no client contributions.")
    round_, state = ledger.global_state()
    record = ledger.client(client_id)
    params = _matching_params(state, record.delta, record.fisher, client_id)
    rest = fisher_of_others(ledger, client_id, state)

    delta = {k: record.delta[k] for k in record.fisher}
    start_round = record.round - 1
    recentered = recenter and start_round in ledger.rounds()
    if recentered:
        _, start = ledger.global_state(start_round)
        delta = {
            k: d - record.fisher[k] / (prior_at(prior_precision, k) + record.fisher[k])
            * (params[k] - start[k])
            for k, d in delta.items()
        }
    removed = remove_client(params, delta, record.fisher, rest, alpha=record.alpha,
                            prior_precision=prior_precision)
    new_state = dict(state)
    new_state.update(removed)
    change = torch.sqrt(sum(((removed[k] - params[k]).double() ** 2).sum() for k in removed))
    report = {
        "client": client_id, "mode": "offline", "global_round": round_,
        "client_round": record.round, "alpha": record.alpha,
        "num_examples": record.num_examples, "recentered": recentered,
        "prior_precision": prior_precision if isinstance(prior_precision, float) else "tensor",
        "update_l2_norm": float(change),
        "remaining_clients": [c for c in ledger.client_ids() if c != client_id],
    }  # fmt: skip
    return new_state, report


def fisher_of_others(
    ledger: Ledger, client_id: str, state: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Σ_{s≠t} α_s F_s over the ledger's other clients (each checked against ``state``)."""
    fisher = ledger.client(client_id).fisher
    rest = {k: torch.zeros_like(v) for k, v in fisher.items()}
    for other in ledger.client_ids():
        if other != client_id:
            stored = ledger.client(other)
            _matching_params(state, stored.delta, stored.fisher, other)
            for key in rest:
                rest[key] += stored.alpha * stored.fisher[key].to(rest[key].dtype)
    return rest


def _matching_params(state, delta, fisher, client_id: str) -> dict[str, Tensor]:
    """The global's parameters that the client's Fisher covers; clear error on a mismatch."""
    for key, value in delta.items():
        if key not in state or tuple(state[key].shape) != tuple(value.shape):
            where = "missing from" if key not in state else "shaped differently in"
            raise LedgerError(
                f"client {client_id!r}'s stored delta['{key}'] is {where} the global "
                "checkpoint: the ledger mixes models."
            )
    return {k: state[k] for k in fisher}


def subtract_applied(ledger: Ledger, client_id: str) -> tuple[dict[str, Tensor], dict]:
    """(new global state, report): the newest checkpoint minus everything the merges added on
    behalf of ``client_id`` over all its rounds (the ledger's ``applied`` sum). Cruder than
    Eq. 13 (it ignores how later rounds built on those updates) but it covers every round,
    not only the client's last one."""
    round_, state = ledger.global_state()
    record = ledger.client(client_id)
    if not record.applied:
        raise LedgerError(f"client {client_id!r} has no accumulated updates in the ledger "
                          "(recorded by FedUGM with a ledger since fl_ugm 0.1).")
    params = _matching_params(state, record.applied, record.applied, client_id)
    new_state = dict(state)
    new_state.update({k: params[k] - record.applied[k].to(params[k].dtype) for k in params})
    report = {"client": client_id, "mode": "subtract-applied", "global_round": round_,
              "client_round": record.round}
    return new_state, report
