"""FedUGM: a Flower strategy that merges client deltas with Fisher preconditioning.

A drop-in replacement for Flower's ``FedAvg`` (it subclasses it: evaluation, metric
aggregation and ``start`` are Flower's own). A round is parse (``fl_ugm.protocol``) → admit
and screen (``fl_ugm.admission``) → the round engine's step (``fl_ugm.engine``) → record
(``fl_ugm.ledger``); the run's options are ``fl_ugm.engine.RunSettings``.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import Tensor

from fl_ugm.admission import (
    FISHER_CLIPPED_METRIC,
    NORM_BOUNDED_METRIC,
    NUM_EXAMPLES_CLIPPED_METRIC,
    SCREENED_OUT_METRIC,
    admit,
    clip_fishers,
    clip_sizes,
    screen,
    who,
)
from fl_ugm.engine import RoundResult, RunSettings, ServerState, client_memory_by_default, step
from fl_ugm.ledger import Ledger, LedgerError
from fl_ugm.memory import ClientMemory, TermsOnDisk
from fl_ugm.merge import InvalidClientInput
from fl_ugm.protocol import (
    PRIOR_RECORD,
    DroppedReply,
    ParsedReply,
    parse_ugm_replies,
    ugm_train_config,
)
from fl_ugm.roster import ClientRoster
from fl_ugm.server_removal import RemovalError, RemovalReport, plan_client_removal

#: ... and how many remembered clients (``client_memory``) a round merged.
REMEMBERED_METRIC = "remembered-clients"
_FEDAVG_OPTIONS = frozenset(inspect.signature(FedAvg.__init__).parameters) - {"self"}


class FedUGM(FedAvg):
    """Uncertainty-based gradient matching (UGM) merging as a Flower strategy.

    θ⁺ = θ + Σ_t α_t (H0 + F_t) / (H0 + Σ_s α_s F_s) · Δ_t

    Parameters
    ----------
    ledger : Ledger or path, optional
        Where to keep, for client removal and resume, every client's latest contribution
        (under the stable ``client-id`` its reply carries), the per-round history, the
        recent checkpoints and the removed clients (``fl_ugm.ledger``). A ledger written by
        a run with other settings or another model is refused; the clients it lists as
        removed are never sampled again.
    resume : bool
        On a ledger that already holds a run: continue it (``start`` then trains from the
        ledger's newest global and server state up to ``num_rounds`` training rounds in all;
        a removal's round does not count). Without it, training on such a ledger is refused
        (``LedgerError``), never mixed with the new run.
    excluded_clients : iterable of str
        Client ids never sampled in this run (e.g. to retrain without them); like removed
        clients, they count against ``min_train_nodes`` and ``min_available_nodes``.
    settings : RunSettings, optional
        The run's options at once, instead of by name.
    memory_dir : path, optional
        The client memory's replies on disk, a file each (RAM: O(model)); None: in RAM.
    **options
        The run's options by name (:class:`fl_ugm.engine.RunSettings` documents each and
        holds its default), and Flower's ``FedAvg`` arguments
        (``fraction_train``, ``min_train_nodes``, ``min_available_nodes``,
        ``weighted_by_key``, ``arrayrecord_key``, ``configrecord_key`` …). Set the minimum
        node counts to the number of clients for full participation in round 1.

    Attributes
    ----------
    settings : RunSettings
    state : ServerState
        After the last round; its global is the one the current round's clients start from
        (``configure_train`` sets it; ``current_arrays`` reads it, as Flower's FedOpt).
    roster : ClientRoster
        Client id ↔ node id, and the excluded (removed) clients.
    round_offset : int
        Rounds completed before this run (``resume_from_ledger``).

    Notes
    -----
    A reply that breaks the contract (``fl_ugm.protocol``) or that the merge rejects (NaN,
    Inf, a negative Fisher) is dropped with the reason logged; with fewer valid replies than
    needed (``min_train_nodes``, or every node asked if fewer were) the round keeps the
    global. A reply without a client id is merged but not remembered (``client_memory``).
    """

    def __init__(self, *, ledger: Ledger | str | Path | None = None, resume: bool = False,
                 excluded_clients: Iterable[str] = (), settings: RunSettings | None = None,
                 memory_dir: str | Path | None = None, **options) -> None:
        run = {k: options.pop(k) for k in list(options) if k in RunSettings.option_names()}
        if settings is not None and run:
            raise TypeError(f"FedUGM: give the run's options by name or as settings=, not both "
                            f"({sorted(run)}).")
        unknown = sorted(set(options) - _FEDAVG_OPTIONS)
        if unknown:
            raise TypeError(f"FedUGM: unknown option(s) {unknown}; FedUGM takes "
                            f"{list(RunSettings.option_names())} and Flower's FedAvg "
                            f"arguments {sorted(_FEDAVG_OPTIONS)}.")
        super().__init__(**options)
        self.ledger = Ledger(ledger) if isinstance(ledger, str | Path) else ledger
        if settings is None:  # the memory, unless chosen: FedUGM samples fewer than all?
            run.setdefault("client_memory", client_memory_by_default(
                self.fraction_train, run.get("carried_precision", 0), self.ledger))
        self.settings = settings or RunSettings(**run)
        memory = ClientMemory(TermsOnDisk(memory_dir)) if memory_dir else ClientMemory()
        self.state = ServerState({}, memory=memory)
        self.round_offset = 0
        self.resume = resume
        self._adopted = False  # the ledger's run is this one (resumed, or begun here)
        self._nodes_asked = 0  # train messages sent in the current round
        removed, bound = (), {}
        if self.ledger is not None:
            self.ledger.lock()  # one writer per ledger, from the start
            self.ledger.ensure_settings(self.settings)
            removed, bound = self.ledger.removed_clients(), self.ledger.nodes()
        self.roster = ClientRoster([*excluded_clients, *removed], bound)

    @property
    def current_arrays(self) -> dict[str, Tensor] | None:
        """The global the round's clients start from (None before ``configure_train``)."""
        return dict(self.state.global_state) or None

    @current_arrays.setter
    def current_arrays(self, arrays: dict[str, Tensor]) -> None:
        self.state = dataclasses.replace(self.state, global_state=dict(arrays))

    def resume_from_ledger(self) -> tuple[int, ArrayRecord] | None:
        """(last completed round, its global) from the ledger, or None if it holds none.

        Adopts the server state stored with that round (optimizer state, carried precision,
        client memory; ``Ledger.resume_state``) and sets ``round_offset`` so that this run's
        round r is round r + offset for the ledger and for the clients (``server-round``,
        which seeds their training): a run killed after round R and restarted on the same
        ledger continues with round R + 1. Start ``Strategy.start`` with the returned arrays
        and the rounds that remain.
        """
        if self.ledger is None:
            raise RuntimeError("FedUGM.resume_from_ledger needs the strategy's ledger.")
        resumed = self.ledger.resume_state(self.settings, excluded=self.roster.excluded,
                                           store=self.state.memory.store)
        self._adopted = True
        if resumed is None:
            return None
        self.round_offset, self.state = resumed
        lost = [name for name, used, kept in (
            ("server optimizer state", self.settings.moves_by_optimizer, self.state.optimizer),
            ("carried precision", self.settings.carried_precision, self.state.carried))
            if used and not kept]
        if lost and self.ledger.history():
            log(WARNING, "resume: the ledger holds no %s after round %d (written by an earlier "
                "fl_ugm); it restarts from 0.", " or ".join(lost), self.round_offset)
        return self.round_offset, ArrayRecord(dict(self.state.global_state))

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              **kwargs) -> Result:
        """Flower's ``Strategy.start`` (same arguments). On a ledger that holds a run, with
        ``resume=True``: from its newest global, for the training rounds left of
        ``num_rounds`` (``result.arrays`` is that global if no round merged)."""
        resumed = None
        if self.resume and not self._adopted and self.ledger is not None:
            resumed = self.resume_from_ledger()
            if resumed is not None:
                removals = self.ledger.removed_clients().values()  # a round number each
                done = self.round_offset - sum(1 for r in removals if r <= self.round_offset)
                initial_arrays, left = resumed[1], max(num_rounds - done, 0)
                log(INFO, "resume: %d of %d training rounds done (the ledger's round %d); "
                    "this run's round r is the ledger's round %d + r.", done, num_rounds,
                    self.round_offset, self.round_offset)
                num_rounds = left
        result = super().start(grid, initial_arrays, num_rounds, **kwargs)
        if resumed is not None and not len(result.arrays):
            result.arrays = initial_arrays
        return result

    def summary(self) -> None:
        """Log the UGM settings, then FedAvg's."""
        lines = [*self.settings.describe(),
                 f"Ledger: {self.ledger.directory if self.ledger else 'none'}; excluded "
                 f"clients: {', '.join(sorted(self.roster.excluded)) or 'none'}"]
        log(INFO, "\t├──> %s", lines[0])
        for index, line in enumerate(lines[1:], 2):
            log(INFO, "\t│\t%s── %s", "└" if index == len(lines) else "├", line)
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global; ask the sampled clients (never an excluded one) for a UGM
        reply. Excluded clients count against the minimum node counts."""
        if self.ledger is not None and not self._adopted and self.ledger.rounds():
            raise LedgerError(
                f"the ledger {self.ledger.directory} already holds a run (up to round "
                f"{self.ledger.rounds()[-1]}); pass FedUGM(resume=True) to continue it, or "
                "give a new ledger directory. It is not mixed with this run.")
        self._adopted = True  # the ledger's run is this one from here
        server_round += self.round_offset
        self.current_arrays = arrays.to_torch_state_dict()
        if self.ledger is not None and server_round - 1 not in self.ledger.rounds():
            self.ledger.record_global(server_round - 1, self.current_arrays)
        if self.fraction_train == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes, "train")
        config = ugm_train_config(config, self.settings)
        config["server-round"] = server_round
        self._nodes_asked = len(node_ids)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self.state.carried is not None:  # the clients' per-coordinate prior δ + C
            record[PRIOR_RECORD] = ArrayRecord(
                {k: self.settings.prior_precision + c for k, c in self.state.carried.items()})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's, over the nodes of clients that are not excluded."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes,
                                "evaluate")
        config["server-round"] = server_round + self.round_offset
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, node_ids, MessageType.EVALUATE)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parse and check the replies, admit and screen them, merge the rest (the round
        engine's step), record the round."""
        if self.current_arrays is None:
            raise RuntimeError("FedUGM.aggregate_train called before configure_train.")
        server_round += self.round_offset
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        parsed, dropped = parse_ugm_replies(valid, self.current_arrays,
                                            weighted_by_key=self.weighted_by_key)
        # replies arrive in whatever order the nodes finished; merging them in client order
        # makes a round's float32 sums, and so a whole run, reproducible from its seed
        parsed.sort(key=lambda r: (r.client_id is None, r.client_id or "", r.node_id))
        parsed = admit(parsed, dropped, self.roster)
        bounded = clip_sizes(self.settings, server_round, parsed)
        clipped = clip_fishers(self.settings, server_round, parsed)
        needed = self._replies_needed()
        screened = screen(self.settings, server_round, parsed, needed)
        stepped = self._step(server_round, parsed, dropped,
                             max(needed - (screened[0] if screened else 0), 1))
        for reply in dropped:
            log(WARNING, "aggregate_train: dropping node %d in round %d%s: %s", reply.node_id,
                server_round, who(reply.client_id), reply.reason)
        if stepped is None:
            return None, None
        after, result = stepped
        if self.ledger is not None:
            self._record(server_round, parsed, result, after)
        self.state = after
        after.memory.keep_only_current()  # the memory's terms of earlier states are not read
        metrics = self.train_metrics_aggr_fn([r.content for r in parsed], self.weighted_by_key)
        if bounded is not None:
            metrics[NUM_EXAMPLES_CLIPPED_METRIC] = bounded
        if clipped is not None:
            metrics[FISHER_CLIPPED_METRIC] = clipped
        if screened is not None:
            metrics[SCREENED_OUT_METRIC], metrics[NORM_BOUNDED_METRIC] = screened
        if self.settings.client_memory:
            metrics[REMEMBERED_METRIC] = len(result.remembered)
        return ArrayRecord(dict(after.global_state)), metrics

    def remove(self, grid: Grid, client_id: str, *, repair_rounds: int = 0,
               train_config: ConfigRecord | None = None,
               evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
               timeout: float = 3600.0, **options) -> tuple[ArrayRecord, RemovalReport]:
        """Remove ``client_id``'s contribution from the newest global in the ledger, adopt
        the server state without it, then run ``repair_rounds`` FL rounds without it.
        Returns (global, report).

        ``options``: ``method`` ("replay", the default, or "eq13"), ``mode`` ("offline":
        the ledger alone, or "online"), the replay's ``correction_budget`` /
        ``correction_policy`` / ``calibrate`` / ``recentring`` / ``shared_rank``
        (``fl_ugm.server_removal.plan_client_removal`` says what each does).
        ``evaluate_fn(round, arrays)`` (as in ``Strategy.start``) gives the report's metrics
        before and after; ``train_config`` goes into every train request. Raises
        :class:`fl_ugm.server_removal.RemovalError`, with nothing changed, if it cannot.
        """
        if self.ledger is None:
            raise RemovalError("FedUGM.remove needs the strategy's ledger; pass ledger=DIR.")
        if repair_rounds < 0:
            raise RemovalError(f"repair_rounds={repair_rounds}; it must be ≥ 0.")
        started = time.perf_counter()
        round_, before = self.ledger.global_state()
        metrics_before = evaluate_fn(round_, ArrayRecord(before)) if evaluate_fn else None
        removal_round = round_ + 1
        plan = plan_client_removal(
            self.ledger, self.settings, self.roster, grid, client_id, before, removal_round,
            timeout=timeout, train_config=train_config, arrayrecord_key=self.arrayrecord_key,
            configrecord_key=self.configrecord_key, weighted_by_key=self.weighted_by_key,
            **options)  # fmt: skip
        deleted = self.ledger.commit_removal(client_id, removal_round, plan.state,
                                             history=plan.history, records=plan.records)
        self.roster.exclude(client_id)
        self.state, self._adopted = plan.state, True  # the run goes on from the removal
        report = plan.report
        report.update(removal_round=removal_round, deleted_files=deleted,
                      removal_seconds=time.perf_counter() - started)
        arrays = ArrayRecord(dict(plan.state.global_state))
        for server_round in range(removal_round + 1, removal_round + 1 + repair_rounds):
            log(INFO, "[REPAIR ROUND %d/%d]", server_round - removal_round, repair_rounds)
            this_run = server_round - self.round_offset  # the strategy adds the offset
            messages = self.configure_train(this_run, arrays, ConfigRecord(
                dict(train_config or {})), grid)
            repaired, _ = self.aggregate_train(
                this_run, grid.send_and_receive(messages, timeout=timeout))
            arrays = repaired if repaired is not None else arrays
        final_round = removal_round + repair_rounds
        self.round_offset = final_round  # a later start's round 1 follows it
        report.update(
            repair_rounds=repair_rounds, final_round=final_round,
            seconds=time.perf_counter() - started,
            metrics_before=dict(metrics_before) if metrics_before is not None else None,
            metrics_after=dict(evaluate_fn(final_round, arrays)) if evaluate_fn else None,
        )  # fmt: skip
        return arrays, report

    # ------------------------------------------------------------------ steps of a round

    def _sample(self, grid: Grid, fraction: float, min_nodes: int, what: str) -> list[int]:
        """Flower's node sampling over the nodes of clients that are not excluded (which
        count against ``min_nodes`` and ``min_available_nodes``)."""
        eligible = self.roster.eligible(grid)
        left_out = len(self.roster.excluded)
        sample_size = max(int(len(eligible.get_node_ids()) * fraction), min_nodes - left_out)
        node_ids, candidates = sample_nodes(eligible, self.min_available_nodes - left_out,
                                            sample_size)
        log(INFO, "configure_%s: Sampled %d nodes (out of %d%s)", what, len(node_ids),
            len(candidates), f"; {left_out} excluded clients left out" if left_out else "")
        return node_ids

    def _replies_needed(self) -> int:
        """min_train_nodes, or every node asked when fewer were (after removals)."""
        return max(min(self.min_train_nodes, self._nodes_asked or self.min_train_nodes), 1)

    def _step(self, server_round: int, replies: list[ParsedReply],
              dropped: list[DroppedReply], needed: int
              ) -> tuple[ServerState, RoundResult] | None:
        """The round engine's step over the replies, or None (logged) if fewer than
        ``needed`` remain or the round cannot merge. A client whose values the merge rejects
        (NaN, Inf, a negative Fisher, an overflow) is moved from ``replies`` to ``dropped``
        and the rest are merged again; a step that leaves the global non-finite keeps it."""
        while len(replies) >= needed:
            try:
                after, result = step(self.settings, self.state,
                                     [r.contribution for r in replies], server_round,
                                     with_shares=self.ledger is not None)
            except ValueError as err:  # InvalidClientInput names the reply at fault
                index = err.client_index if isinstance(err, InvalidClientInput) else None
                if index is None or index >= len(replies):  # e.g. keys no server Fisher has
                    log(WARNING, "aggregate_train: round %d cannot merge (%s); keeping the "
                        "global model.", server_round, err)
                    return None
                bad = replies.pop(index)
                dropped.append(DroppedReply(bad.node_id, bad.client_id, str(err)))
                continue
            if all(bool(v.isfinite().all()) for v in after.global_state.values()
                   if v.is_floating_point()):
                return after, result
            log(WARNING, "aggregate_train: round %d's server step left the global non-finite "
                "(server_lr or server_momentum too large for these updates); keeping the "
                "global model.", server_round)
            return None
        log(WARNING, "aggregate_train: round %d has %d valid UGM replies, fewer than the %d "
            "needed (min_train_nodes=%d); keeping the global model.", server_round,
            len(replies), needed, self.min_train_nodes)
        return None

    def _record(self, server_round: int, replies: list[ParsedReply], result: RoundResult,
                after: ServerState) -> None:
        """The merged round into the ledger, as one commit."""
        for reply in replies:
            if reply.client_id is None:
                log(WARNING, "ledger: node %d sent no client-id; its contribution enters the "
                    "history but it cannot be removed later (pass client_id to "
                    "fl_ugm.client.handle_train).", reply.node_id)
        self.ledger.record_round(server_round, self.state, [r.contribution for r in replies],
                                 result, after, nodes={r.client_id: r.node_id for r in replies
                                                       if r.client_id is not None})
        log(INFO, "ledger: round %d recorded; history %.1f MB (%d rounds, %s)", server_round,
            self.ledger.history_bytes() / 1e6, len(self.ledger.history()),
            self.ledger.history_dtype)
