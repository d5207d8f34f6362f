"""Remove a client's contribution from the global model using the ledger.

Two parts, both per coordinate (parameter entry):

1. **Eq. 13** (docs/design.md §1), where the remaining clients' data informs the coordinate:

       θ₋t = θ − α_t (H0 + F_t) / (H0 + Σ_{s≠t} α_s F_s) · Δ_t

   *Online*, Δ_t and F_t come fresh from the client fine-tuning from the current θ (exact
   for linear regression). *Offline*, they are its last stored contribution, which started
   from θ_start, not from θ; by default the delta is re-centred to the current model with
   the same quadratic model the derivation uses (ℓ_t's Hessian ≈ F_t):

       Δ'_t = Δ_t − F_t / (H0 + F_t) · (θ − θ_start)

   which makes the offline removal exact for linear regression too. It needs the checkpoint
   of the round before the client's contribution; without it the plain Δ_t is used and the
   report says so.

2. **Revert uninformed coordinates**, where the remaining clients' summed Fisher is
   negligible (Σ_{s≠t} α_s F_s ≤ ``uninformed_threshold`` · H0): no other client's data
   moves such a coordinate (for a pixel that is always blank in their data, its first-layer
   weights get exactly zero gradient), so retraining without t leaves it where it started,
   and the exact removal is to subtract everything the merges added there on t's behalf over
   all rounds (the ledger's ``applied`` sum). Eq. 13 alone cannot do this in multi-round
   FL: Δ_t and F_t are one round's, and once the global fits t's data they are ≈ 0 (a
   backdoor is exactly such a case). Measured in ``simulations.unlearn``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fl_ugm.ledger import Ledger, LedgerCorruptError, LedgerError
from fl_ugm.merge import PriorPrecision, prior_at, remove_client
from fl_ugm.merge_rules import merge_rule

#: Σ_{s≠t} α_s F_s at or below this × H0 counts as "no remaining client informs it".
#: Measured on the unlearning benchmark: 1e-6 to 1e-3 give the same result.
UNINFORMED_FISHER = 1e-4


def removal_update(
    params: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    fisher_rest: Mapping[str, Tensor],
    *,
    alpha: float,
    prior_precision: PriorPrecision,
    applied: Mapping[str, Tensor] | None = None,
    uninformed_threshold: float = UNINFORMED_FISHER,
) -> tuple[dict[str, Tensor], float]:
    """(θ₋t for the keys of ``fisher``, fraction of entries reverted): Eq. 13, then, where
    ``fisher_rest`` ≤ ``uninformed_threshold`` · H0 and ``applied`` (the client's summed
    merge shares over all rounds) is given, θ − applied instead. Units as in
    :func:`fl_ugm.merge.remove_client` (Fishers are sums over examples)."""
    removed = remove_client({k: params[k] for k in fisher}, delta, fisher, fisher_rest,
                            alpha=alpha, prior_precision=prior_precision)
    if applied is None:
        return removed, 0.0
    reverted = total = 0
    for key, value in removed.items():
        if key not in applied:
            continue
        uninformed = fisher_rest[key] <= uninformed_threshold * prior_at(prior_precision, key)
        reverted_value = params[key] - applied[key].to(params[key].dtype)
        removed[key] = torch.where(uninformed, reverted_value, value)
        reverted += int(uninformed.sum())
        total += uninformed.numel()
    return removed, reverted / max(total, 1)


def remove_from_ledger(
    ledger: Ledger,
    client_id: str,
    *,
    prior_precision: PriorPrecision | None = None,
    recenter: bool = True,
    revert_uninformed: bool = True,
    client_reply: tuple[Mapping[str, Tensor], Mapping[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], dict]:
    """(new global state, report) after removing ``client_id`` from the newest checkpoint.

    ``client_reply``: (Δ_t, F_t) the client just computed by fine-tuning from the newest
    checkpoint (online removal); without it the stored contribution is used (offline).
    ``prior_precision`` (H0) defaults to the one the run merged with: the ledger's stored δ
    through its stored merge rule (``fl_ugm.merge_rules``). Nothing on disk changes: the
    caller decides whether to save the result and commit it (``Ledger.commit_removal``).
    """
    rule = merge_rule(str(ledger.meta.get("merge", "ugm")))
    if not rule.uses_fisher:
        raise LedgerError(f"this ledger's run merged with {rule.name!r}; client removal needs a "
                          "Fisher-weighted rule ('ugm' or 'fisher-averaging').")
    if prior_precision is None:
        if "prior_precision" not in ledger.meta:
            raise LedgerError("no prior precision given and none stored in the ledger's meta; "
                              "pass the δ the run used.")
        prior_precision = rule.prior(float(ledger.meta["prior_precision"]))
    if not ledger.client_ids():
        raise LedgerError(f"the ledger at {ledger.directory} holds no client contributions.")
    round_, state = ledger.global_state()
    record = ledger.client(client_id)
    params = _matching_params(state, record.delta, record.fisher, client_id)
    rest = fisher_of_others(ledger, client_id, state, like=record.fisher)

    recentered = False
    if client_reply is not None:
        delta, fisher = client_reply
        _matching_params(state, delta, fisher, client_id)
    else:
        fisher = record.fisher
        delta = {k: record.delta[k] for k in fisher}
        recentered = recenter and record.round - 1 in ledger.rounds()
        if recentered:
            _, start = ledger.global_state(record.round - 1)
            delta = {
                k: d - fisher[k] / (prior_at(prior_precision, k) + fisher[k])
                * (params[k] - start[k])
                for k, d in delta.items()
            }
    removed, reverted = removal_update(
        params, delta, fisher, rest, alpha=record.alpha, prior_precision=prior_precision,
        applied=record.applied if revert_uninformed and record.applied else None,
    )  # fmt: skip
    new_state = dict(state)
    new_state.update(removed)
    change = torch.sqrt(sum(((removed[k] - params[k]).double() ** 2).sum() for k in removed))
    report = {
        "client": client_id, "mode": "online" if client_reply is not None else "offline",
        "global_round": round_, "client_round": record.round, "alpha": record.alpha,
        "num_examples": record.num_examples, "recentered": recentered,
        "reverted_fraction": reverted,
        "prior_precision": prior_precision if isinstance(prior_precision, float) else "tensor",
        "update_l2_norm": float(change),
        "remaining_clients": [c for c in ledger.client_ids() if c != client_id],
    }  # fmt: skip
    return new_state, report


def fisher_of_others(
    ledger: Ledger, client_id: str, state: Mapping[str, Tensor], like: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Σ_{s≠t} α_s F_s over the ledger's other clients (each checked against ``state``), with
    the keys, shapes and dtypes of ``like`` (client t's Fisher)."""
    rest = {k: torch.zeros_like(v) for k, v in like.items()}
    for other in ledger.client_ids():
        if other != client_id:
            try:
                stored = ledger.client(other)
            except LedgerCorruptError as err:
                raise LedgerCorruptError(
                    f"removing client {client_id!r} needs the stored Fisher of every remaining "
                    f"client, and client {other!r}'s record cannot be read: {err}") from err
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
