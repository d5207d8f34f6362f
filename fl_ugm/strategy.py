"""FedUGM: Flower strategy that merges client deltas with Fisher preconditioning.

A drop-in replacement for Flower's ``FedAvg`` (it subclasses it: sampling, evaluation and
metric aggregation are Flower's own). Each round it remembers the global arrays it sends,
asks clients for a UGM reply (``fl_ugm.client``: a delta, a diagonal Fisher, num-examples),
validates every reply, drops bad ones with a logged reason, and merges the rest with
:func:`fl_ugm.merge.ugm_merge` (DESIGN §1, appendix Eq. 6).
"""

from __future__ import annotations

import io
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from fl_ugm.client import (
    CLIENT_ID_KEY,
    CLIENT_RECORD,
    FISHER_ESTIMATORS,
    FISHER_KEY,
    PRIOR_KEY,
    REMOVAL_KEY,
    UGM_KEY,
)
from fl_ugm.ledger import Ledger
from fl_ugm.merge import (
    FISHER_AVERAGING_EPS,
    InvalidClientInput,
    clip_fisher_inflation,
    fisher_averaging,
    prior_at,
    task_arithmetic,
    ugm_merge,
    weighted_average,
)
from fl_ugm.removal import remove_from_ledger

ALPHA_MODES = ("num-examples", "uniform", "ones")
#: How the parameters are merged: UGM (Eq. 6), or one of its limits, for comparisons on the
#: same client replies: H0 → 0 (Fisher-weighted averaging) or F ≡ 0 (task arithmetic).
MERGE_RULES = ("ugm", "fisher-averaging", "task-arithmetic")
#: Client removal: from the ledger alone, or with a fresh Δ_t, F_t from the client.
REMOVAL_MODES = ("offline", "online")


class RemovalError(RuntimeError):
    """A client removal could not be carried out; the global model and ledger are unchanged."""


@dataclass
class ClientUpdate:
    """One validated UGM reply, as float tensors."""

    node_id: int
    client_id: str | None  # the stable id the client sent (CLIENT_ID_KEY), if any
    num_examples: float
    delta: dict[str, Tensor]
    fisher: dict[str, Tensor]
    content: RecordDict


class FedUGM(FedAvg):
    """Uncertainty-based gradient matching (UGM) merging as a Flower strategy.

    θ⁺ = θ + Σ_t α_t (H0 + F_t) / (H0 + Σ_s α_s F_s) · Δ_t

    Parameters
    ----------
    prior_precision : float (default: 1.0)
        δ, the precision of the Gaussian prior centred on the global model, in the units of
        a SUMMED loss (a Fisher). Clients use it as their proximal term (FedProx with
        μ = δ / n_t); the server uses H0 = δ (+ ``server_fisher``) in the merge.
    alpha : {"num-examples", "uniform", "ones"} (default: "num-examples")
        Client weights before scaling: n_t / Σn (the FL default), 1/T, or 1 (the paper's
        task-arithmetic setting).
    scale : float (default: 1.0)
        λ, multiplies every α_t.
    fisher : {"sampled", "empirical", "training"} (default: "sampled")
        The Fisher estimator clients are asked for: labels drawn from the model (the true
        Fisher), true labels, or the cheap estimate accumulated during local training.
    server_fisher : Mapping[str, Tensor], optional
        n_0·F_0, a Fisher (sum) of data the server holds; added to δ in H0 on the server.
    ledger : Ledger or path, optional
        Where to keep, for later client removal, every client's latest contribution (under
        the stable ``client-id`` its reply carries) and the recent global checkpoints
        (``fl_ugm.ledger``). Each round's start global is stored as round r − 1.
    merge : {"ugm", "fisher-averaging", "task-arithmetic"} (default: "ugm")
        The merge rule. The other two are UGM's limits (H0 → 0; F ≡ 0, i.e. θ + Σ α_t Δ_t),
        offered as baselines that see exactly the same client training and replies.
    fisher_clip : float or None (default: 3.0)
        The Fisher-inflation defence: a client weights itself by the Fisher it reports, so
        one inflated Fisher would take over the merge. Each round, per parameter tensor,
        each client's per-example Fisher mass ΣF_t / n_t is compared with the (lower) median
        client's; a tensor above ``fisher_clip`` × that median is scaled down to exactly the
        bound, with a logged warning. A client then counts for at most ``fisher_clip``
        median clients of its size. ``None`` turns the defence off. Measured in
        ``benchmarks/bench_attack.py``.
    **fedavg_kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``,
        ``min_train_nodes``, ``min_available_nodes``, ``train_metrics_aggr_fn`` …). Set the
        minimum node counts to the number of clients for full participation in round 1.

    Notes
    -----
    Replies must hold a ``"delta"`` ArrayRecord (every float entry of the global), a
    ``"fisher"`` ArrayRecord (the parameters: a subset of those keys, same shapes, ≥ 0) and a
    ``"metrics"`` MetricRecord with ``num-examples`` > 0. Delta entries without a Fisher
    are buffers: float buffers are averaged by num-examples, non-float entries are kept from
    the global model. A reply that fails validation is dropped and the reason is logged;
    with fewer than ``min_train_nodes`` valid replies the round keeps the global model.
    """

    def __init__(
        self,
        *,
        prior_precision: float = 1.0,
        alpha: str = "num-examples",
        scale: float = 1.0,
        fisher: str = "sampled",
        server_fisher: Mapping[str, Tensor] | None = None,
        merge: str = "ugm",
        ledger: Ledger | str | Path | None = None,
        fisher_clip: float | None = 3.0,
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        if not (math.isfinite(prior_precision) and prior_precision > 0):
            raise ValueError(
                f"FedUGM: prior_precision={prior_precision}; it must be finite and > 0."
            )
        if alpha not in ALPHA_MODES:
            raise ValueError(f"FedUGM: alpha={alpha!r}; choose one of {ALPHA_MODES}.")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"FedUGM: scale={scale}; it must be finite and > 0.")
        if fisher not in FISHER_ESTIMATORS:
            raise ValueError(f"FedUGM: fisher={fisher!r}; choose one of {FISHER_ESTIMATORS}.")
        if merge not in MERGE_RULES:
            raise ValueError(f"FedUGM: merge={merge!r}; choose one of {MERGE_RULES}.")
        if fisher_clip is not None and not (math.isfinite(fisher_clip) and fisher_clip >= 1):
            raise ValueError(f"FedUGM: fisher_clip={fisher_clip}; it must be ≥ 1, or None.")
        self.fisher_clip = fisher_clip
        self.merge = merge
        self.prior_precision = float(prior_precision)
        self.alpha = alpha
        self.scale = float(scale)
        self.fisher = fisher
        self.server_fisher = dict(server_fisher) if server_fisher is not None else None
        self._global: dict[str, Tensor] | None = None
        self.excluded_clients: set[str] = set()
        self._node_of_client: dict[str, int] = {}
        self._messages_sent = 0  # in the current round, after excluding removed clients
        self.round_offset = 0  # rounds completed before this run (see resume_from_ledger)
        self.ledger = Ledger(ledger) if isinstance(ledger, str | Path) else ledger
        if self.ledger is not None:
            self.ledger.set_meta(prior_precision=self.prior_precision, alpha=alpha,
                                 scale=self.scale, merge=merge)

    def resume_from_ledger(self) -> tuple[int, ArrayRecord] | None:
        """(last completed round, its global) from the ledger, or None if it holds none.

        Sets ``round_offset`` so that this run's round r is round r + offset for the ledger
        and for the clients (``server-round``, which seeds their training): a run killed
        after round R and restarted on the same ledger continues with round R + 1, from the
        global of round R and every client's contribution recorded up to it. Start
        ``Strategy.start`` with the returned arrays and the rounds that remain.
        """
        if self.ledger is None:
            raise RuntimeError("FedUGM.resume_from_ledger needs the strategy's ledger.")
        if not self.ledger.rounds():
            return None
        round_, state = self.ledger.global_state()
        self.round_offset = round_
        return round_, ArrayRecord(state)

    def exclude_client(self, client_id: str) -> None:
        """Never sample ``client_id`` again, and drop any reply it still sends (after its
        removal). Its node is recognised from the ``client-id`` of its earlier replies."""
        self.excluded_clients.add(client_id)

    def summary(self) -> None:
        """Log the UGM settings, then FedAvg's."""
        log(INFO, "\t├──> UGM merge (rule: %s):", self.merge)
        log(INFO, "\t│\t├── Prior precision δ: %g%s", self.prior_precision,
            " (+ server Fisher)" if self.server_fisher is not None else "")
        log(INFO, "\t│\t├── Alpha: %s × scale %g", self.alpha, self.scale)
        log(INFO, "\t│\t├── Client Fisher estimator: %s", self.fisher)
        log(INFO, "\t│\t└── Fisher-inflation clip: %s", "off" if self.fisher_clip is None
            else f"{self.fisher_clip:g} × the median client's per-example Fisher mass")
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays and ask the sampled clients for a UGM reply."""
        server_round += self.round_offset
        self._global = arrays.to_torch_state_dict()
        if self.ledger is not None and server_round - 1 not in self.ledger.rounds():
            self.ledger.record_global(server_round - 1, self._global)
        config[UGM_KEY] = True
        config[FISHER_KEY] = self.fisher
        config[PRIOR_KEY] = self.prior_precision
        messages = super().configure_train(server_round, arrays, config, grid)
        excluded = {self._node_of_client[c] for c in self.excluded_clients
                    if c in self._node_of_client}
        messages = [m for m in messages if m.metadata.dst_node_id not in excluded]
        self._messages_sent = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, drop bad ones, merge the rest with ``ugm_merge``."""
        if self._global is None:
            raise RuntimeError("FedUGM.aggregate_train called before configure_train.")
        server_round += self.round_offset
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        updates = self._parse_replies(server_round, valid)
        if self.fisher_clip is not None and self.merge != "task-arithmetic":
            self._clip_fisher(server_round, updates)
        # after a removal fewer nodes are asked than min_train_nodes; require all of those
        needed = max(min(self.min_train_nodes, self._messages_sent or self.min_train_nodes), 1)
        while len(updates) >= needed:
            try:
                new_global = self._merge(updates)
            except InvalidClientInput as err:
                if err.client_index is None:
                    raise
                bad = updates.pop(err.client_index)
                log(WARNING, "aggregate_train: dropping node %d in round %d: %s",
                    bad.node_id, server_round, err)
                continue
            metrics = self.train_metrics_aggr_fn(
                [u.content for u in updates], self.weighted_by_key
            )
            if self.ledger is not None:
                self._record(server_round, updates, new_global)
            return ArrayRecord(new_global), metrics
        log(WARNING, "aggregate_train: round %d has %d valid UGM replies, fewer than the "
            "%d needed (min_train_nodes=%d); keeping the global model.", server_round,
            len(updates), needed, self.min_train_nodes)
        return None, None

    # ------------------------------------------------------------------ client removal

    def remove(
        self,
        grid: Grid,
        client_id: str,
        *,
        mode: str = "offline",
        repair_rounds: int = 0,
        train_config: ConfigRecord | None = None,
        evaluate_fn=None,
        timeout: float = 3600.0,
    ) -> tuple[ArrayRecord, dict]:
        """Remove ``client_id``'s contribution from the newest global in the ledger, then run
        ``repair_rounds`` FL rounds with the remaining clients. Returns (global, report).

        ``mode="offline"`` uses the ledger alone; ``"online"`` first sends the client the
        current global with a removal instruction (a train message with ``REMOVAL_KEY``) and
        uses the Δ_t, F_t it returns (``fl_ugm.removal``). The removal result is stored in
        the ledger as the next round's global, the client's contribution is deleted from the
        ledger, and the client is never sampled again. ``evaluate_fn(round, arrays)`` (as in
        ``Strategy.start``) gives the report's metrics before and after. Raises
        :class:`RemovalError` (nothing changed) if the removal cannot be done.
        """
        if self.ledger is None:
            raise RemovalError("FedUGM.remove needs the strategy's ledger; pass ledger=DIR.")
        if mode not in REMOVAL_MODES:
            raise RemovalError(f"removal mode {mode!r}; choose one of {REMOVAL_MODES}.")
        if repair_rounds < 0:
            raise RemovalError(f"repair_rounds={repair_rounds}; it must be ≥ 0.")
        started = time.perf_counter()
        round_, state = self.ledger.global_state()
        self._global = state
        before = evaluate_fn(round_, ArrayRecord(state)) if evaluate_fn else None
        reply = None
        if mode == "online":
            reply = self._online_contribution(grid, client_id, round_ + 1, timeout)
        prior = self._prior(self.server_fisher or ())  # δ, or δ + n0·F0 per tensor
        try:  # validates the client's Δ_t, F_t (finite, F ≥ 0) before anything is written
            new_state, report = remove_from_ledger(self.ledger, client_id,
                                                   prior_precision=prior, client_reply=reply)
        except InvalidClientInput as err:
            raise RemovalError(f"removing client {client_id!r} failed: {err} Nothing was "
                               "changed.") from err
        removal_round = round_ + 1
        self.ledger.record_global(removal_round, new_state)
        self.ledger.forget_client(client_id)
        self.exclude_client(client_id)
        report.update(removal_round=removal_round, removal_seconds=time.perf_counter() - started)
        log(INFO, "removed client %r (%s) from the round-%d global: |change| = %.4g, %.1f %% of "
            "entries reverted.", client_id, mode, round_, report["update_l2_norm"],
            100 * report["reverted_fraction"])

        arrays = ArrayRecord(new_state)
        if repair_rounds and client_id not in self._node_of_client:
            self._discover_clients(grid, timeout)  # so the removed client is not sampled
        for server_round in range(removal_round + 1, removal_round + 1 + repair_rounds):
            log(INFO, "[REPAIR ROUND %d/%d]", server_round - removal_round, repair_rounds)
            this_run = server_round - self.round_offset  # the two methods add the offset
            messages = self.configure_train(this_run, arrays, ConfigRecord(
                dict(train_config or {})), grid)
            replies = grid.send_and_receive(messages, timeout=timeout)
            repaired, _ = self.aggregate_train(this_run, replies)
            arrays = repaired if repaired is not None else arrays
        final_round = removal_round + repair_rounds
        report.update(
            repair_rounds=repair_rounds, final_round=final_round,
            seconds=time.perf_counter() - started,
            metrics_before=dict(before) if before is not None else None,
            metrics_after=dict(evaluate_fn(final_round, arrays)) if evaluate_fn else None,
        )  # fmt: skip
        return arrays, report

    def _online_contribution(self, grid: Grid, client_id: str, server_round: int,
                             timeout: float) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Ask the client to fine-tune from the current global; its validated (Δ_t, F_t)."""
        if client_id not in self._node_of_client:
            self._discover_clients(grid, timeout)
        node = self._node_of_client.get(client_id)
        if node is None:
            raise RemovalError(
                f"no connected node identifies as client {client_id!r}, so it cannot take "
                "part in an online removal; use mode='offline' (ledger only)."
            )
        config = ConfigRecord({UGM_KEY: True, FISHER_KEY: self.fisher,
                               PRIOR_KEY: self.prior_precision, REMOVAL_KEY: True,
                               "server-round": server_round})
        content = RecordDict({"arrays": ArrayRecord(self._global), "config": config})
        message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node)
        replies = list(grid.send_and_receive([message], timeout=timeout))
        if not replies or replies[0].has_error():
            why = replies[0].error.reason if replies else f"no reply within {timeout:.0f} s"
            raise RemovalError(f"online removal of client {client_id!r} failed: {why}. "
                               "Nothing was changed; retry, or use mode='offline'.")
        try:
            update = self._parse_reply(node, replies[0].content)
        except ValueError as err:
            raise RemovalError(f"client {client_id!r}'s removal reply is invalid: {err}") from err
        return {k: update.delta[k] for k in update.fisher}, update.fisher

    def _discover_clients(self, grid: Grid, timeout: float) -> None:
        """Ask every connected node for its stable client id (``handle_query``)."""
        messages = [Message(content=RecordDict(), message_type=MessageType.QUERY,
                            dst_node_id=node) for node in grid.get_node_ids()]
        for reply in grid.send_and_receive(messages, timeout=min(timeout, 120.0)):
            if not reply.has_error():
                record = reply.content.config_records.get(CLIENT_RECORD, {})
                if CLIENT_ID_KEY in record:
                    self._node_of_client[str(record[CLIENT_ID_KEY])] = reply.metadata.src_node_id

    # ------------------------------------------------------------------ internals

    def _parse_replies(self, server_round: int, replies: list[Message]) -> list[ClientUpdate]:
        """Structural checks; a reply that fails is dropped with a logged reason."""
        parsed: list[ClientUpdate] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                parsed.append(self._parse_reply(node, msg.content))
            except ValueError as err:
                log(WARNING, "aggregate_train: dropping node %d in round %d: %s",
                    node, server_round, err)
        if not parsed:
            return parsed
        # Buffers are the delta keys a client sends no Fisher for; every reply must agree.
        # The most common Fisher key set wins, so one odd client cannot drop the others.
        key_sets = Counter(frozenset(u.fisher) for u in parsed)
        expected, _ = key_sets.most_common(1)[0]
        kept = []
        for update in parsed:
            if frozenset(update.fisher) != expected:
                log(WARNING, "aggregate_train: dropping node %d in round %d: its Fisher covers "
                    "%d tensors, the other clients' %d.", update.node_id, server_round,
                    len(update.fisher), len(expected))
            else:
                kept.append(update)
        return kept

    def _parse_reply(self, node_id: int, content: RecordDict) -> ClientUpdate:
        arrays = content.array_records
        for key in ("delta", "fisher"):
            if key not in arrays:
                raise ValueError(
                    f"the reply has no '{key}' ArrayRecord (records: {sorted(arrays)}); is "
                    "the ClientApp using fl_ugm.client.handle_train?"
                )
        metric_records = content.metric_records
        if len(metric_records) != 1:
            raise ValueError(f"expected one MetricRecord, got {len(metric_records)}.")
        metrics = next(iter(metric_records.values()))
        num_examples = metrics.get(self.weighted_by_key)
        if not isinstance(num_examples, int | float) or isinstance(num_examples, bool):
            raise ValueError(f"'{self.weighted_by_key}' is {num_examples!r}, not a number.")
        if not (math.isfinite(num_examples) and num_examples > 0):
            raise ValueError(f"'{self.weighted_by_key}' = {num_examples}; it must be > 0.")

        float_keys = {k for k, v in self._global.items() if v.is_floating_point()}
        delta_record, fisher_record = arrays["delta"], arrays["fisher"]
        if set(delta_record.keys()) != float_keys:
            raise ValueError(
                "delta keys differ from the global model's float entries (missing: "
                f"{sorted(float_keys - set(delta_record.keys()))[:5]}, unexpected: "
                f"{sorted(set(delta_record.keys()) - float_keys)[:5]})."
            )
        if not fisher_record.keys() or not set(fisher_record.keys()) <= float_keys:
            raise ValueError("the Fisher must cover a non-empty subset of the delta's keys.")
        delta = self._tensors("delta", delta_record, require_global_dtype=True)
        fisher = self._tensors("fisher", fisher_record, require_global_dtype=False)
        client_id = content.config_records.get(CLIENT_RECORD, {}).get(CLIENT_ID_KEY)
        if client_id is not None:
            client_id = str(client_id)
            if client_id in self.excluded_clients:
                raise ValueError(f"client {client_id!r} was removed; its reply is ignored.")
            self._node_of_client[client_id] = node_id
        return ClientUpdate(node_id, client_id, float(num_examples), delta, fisher, content)

    def _tensors(self, name: str, record: ArrayRecord, *, require_global_dtype: bool):
        out = {}
        for key, array in record.items():
            expected = self._global[key]
            if tuple(array.shape) != tuple(expected.shape):
                raise ValueError(
                    f"{name}['{key}'] has shape {tuple(array.shape)}, the global "
                    f"{tuple(expected.shape)}."
                )
            wanted = str(expected.dtype).removeprefix("torch.")
            if require_global_dtype and array.dtype != wanted:
                raise ValueError(f"{name}['{key}'] has dtype {array.dtype}, the global {wanted}.")
            if array.dtype not in ("float16", "bfloat16", "float32", "float64"):
                raise ValueError(f"{name}['{key}'] has dtype {array.dtype}; expected a float.")
            out[key] = _tensor_view(array)
        return out

    def _record(self, server_round: int, updates: list[ClientUpdate], new_global) -> None:
        """Store each merged client's contribution and the new global in the ledger, as one
        commit (a crash leaves the ledger at the previous round or at this one).

        Besides the latest Δ_t and F_t, each client's ``applied`` running sum grows by this
        round's share of the merged update that is due to it: α_t (H0 + F_t) Δ_t / (H0 +
        Σ_s α_s F_s) for UGM (H0 → 0 for Fisher averaging), α_t Δ_t for task arithmetic.
        """
        alphas = self._alphas(updates)
        keys = list(updates[0].fisher)
        if self.merge == "task-arithmetic":
            prior, denominator = None, None
        else:
            prior = self._prior(keys) if self.merge == "ugm" else FISHER_AVERAGING_EPS
            denominator = {k: _double(prior_at(prior, k)) + sum(a * u.fisher[k].double()
                                                     for a, u in zip(alphas, updates, strict=True))
                           for k in keys}
        with self.ledger.batch():
            for update, alpha in zip(updates, alphas, strict=True):
                if update.client_id is None:
                    log(WARNING, "ledger: node %d sent no client-id; its contribution is not "
                        "recorded and it cannot be removed later.", update.node_id)
                    continue
                share = {}
                for k in keys:
                    delta = update.delta[k].double()
                    if denominator is None:
                        share[k] = alpha * delta
                    else:
                        weight = _double(prior_at(prior, k)) + update.fisher[k].double()
                        share[k] = alpha * weight * delta / denominator[k]
                if update.client_id in self.ledger.client_ids():
                    previous = self.ledger.client(update.client_id).applied
                    share = {k: v + previous[k].double() if k in previous else v
                             for k, v in share.items()}
                self.ledger.record_client(
                    update.client_id, round_=server_round, delta=update.delta,
                    fisher=update.fisher, num_examples=update.num_examples, alpha=alpha,
                    applied={k: v.to(self._global[k].dtype) for k, v in share.items()})
            self.ledger.record_global(server_round, new_global)

    def _clip_fisher(self, server_round: int, updates: list[ClientUpdate]) -> None:
        """The Fisher-inflation defence (``fisher_clip``); logs every clipped tensor."""
        fishers, clipped = clip_fisher_inflation(
            [u.fisher for u in updates], [u.num_examples for u in updates], self.fisher_clip)
        for update, fisher in zip(updates, fishers, strict=True):
            update.fisher = fisher
        for index, key, ratio in clipped:
            update = updates[index]
            who = f" (client {update.client_id!r})" if update.client_id else ""
            log(WARNING, "aggregate_train: node %d%s in round %d reports a Fisher on '%s' "
                "%.3g× the median client's (per example); scaled down to %g×.",
                update.node_id, who, server_round, key, ratio, self.fisher_clip)

    def _alphas(self, updates: list[ClientUpdate]) -> list[float]:
        if self.alpha == "num-examples":
            total = math.fsum(u.num_examples for u in updates)
            base = [u.num_examples / total for u in updates]
        elif self.alpha == "uniform":
            base = [1.0 / len(updates)] * len(updates)
        else:
            base = [1.0] * len(updates)
        return [self.scale * a for a in base]

    def _prior(self, keys: Iterable[str]) -> float | dict[str, Tensor]:
        if self.server_fisher is None:
            return self.prior_precision
        missing = [k for k in keys if k not in self.server_fisher]
        if missing:
            raise ValueError(f"FedUGM: server_fisher has no entry for {missing[:5]}.")
        return {k: self.prior_precision + self.server_fisher[k] for k in keys}

    def _merge(self, updates: list[ClientUpdate]) -> dict[str, Tensor]:
        """New global state: UGM for parameters, num-examples average for float buffers."""
        param_keys = list(updates[0].fisher)
        params = {k: self._global[k] for k in param_keys}
        deltas = [{k: u.delta[k] for k in param_keys} for u in updates]
        fishers = [u.fisher for u in updates]
        alphas = self._alphas(updates)
        if self.merge == "ugm":
            merged = ugm_merge(params, deltas, fishers, alphas=alphas,
                               prior_precision=self._prior(param_keys))
        elif self.merge == "fisher-averaging":
            merged = fisher_averaging(params, deltas, fishers, alphas=alphas)
        else:
            merged = task_arithmetic(params, deltas, alphas=alphas)
        buffer_keys = [k for k in updates[0].delta if k not in updates[0].fisher]
        if buffer_keys:
            merged.update(weighted_average(
                {k: self._global[k] for k in buffer_keys},
                [{k: u.delta[k] for k in buffer_keys} for u in updates],
                weights=[u.num_examples for u in updates],
            ))  # fmt: skip
        return {key: merged.get(key, value) for key, value in self._global.items()}


def _double(value: float | Tensor) -> float | Tensor:
    return value.double() if isinstance(value, Tensor) else value


def _tensor_view(array: Array) -> Tensor:
    """A read-only tensor over the bytes of a serialized NumPy ``Array``, without a copy.

    ``Array.numpy()`` deserializes into a fresh array; the strategy holds every reply's
    delta and Fisher at once, so a copy would double the memory of a round.
    """
    if array.stype != "numpy.ndarray":
        raise ValueError(f"unsupported array serialization {array.stype!r}.")
    header = io.BytesIO(array.data)
    version = np.lib.format.read_magic(header)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        return torch.from_numpy(array.numpy())
    shape, fortran_order, dtype = readers[version](header)
    if fortran_order or dtype.hasobject:
        return torch.from_numpy(array.numpy())
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=header.tell())
    with warnings.catch_warnings():  # read-only buffer: fl_ugm never writes to inputs
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(flat.reshape(shape))
