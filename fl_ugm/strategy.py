"""FedUGM: a Flower strategy that merges client deltas with Fisher preconditioning.

A drop-in replacement for Flower's ``FedAvg`` (it subclasses it: evaluation, metric
aggregation and ``start`` are Flower's own). Each round it remembers the global it sends,
asks the sampled clients for a UGM reply (``fl_ugm.protocol``), drops invalid replies with a
logged reason, clips inflated Fishers, screens the deltas (``fl_ugm.robust``), merges the
rest with its merge rule
(``fl_ugm.merge_rules``; Eq. 6 of docs/design.md §1 by default) and, with a ledger, records
the round for later client removal (``FedUGM.remove``, ``fl_ugm.server_removal``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import Tensor

from fl_ugm.client_memory import ClientMemory
from fl_ugm.ledger import Contribution, Ledger, Remembered
from fl_ugm.merge import InvalidClientInput, PriorPrecision, carry_precision, with_carried
from fl_ugm.merge_rules import ALPHA_MODES, MERGE_RULES, client_alphas, merge_round, merge_rule
from fl_ugm.protocol import (
    FISHER_ESTIMATORS,
    PRIOR_RECORD,
    WIRE_DTYPES,
    ClientUpdate,
    DroppedReply,
    parse_ugm_replies,
    ugm_train_config,
)
from fl_ugm.robust import UpdateScreen, clip_fisher_inflation
from fl_ugm.roster import ClientRoster
from fl_ugm.server_optimizer import (
    SERVER_OPTIMIZERS,
    OptimizerState,
    check_server_optimizer,
    server_step,
    server_update,
    uses_server_optimizer,
)

#: Fisher clips up to this many times the median are honest variation (logged at INFO):
#: honest clients reached 13× at lr 0.5 in simulations.unlearn; the attack benchmark's
#: inflation is 10⁶×. Beyond it a client is likely inflating its Fisher (a WARNING).
CLIP_WARNING_RATIO = 100.0
#: The round's aggregated train metrics carry how many client tensors the clip scaled down.
FISHER_CLIPPED_METRIC = "fisher-clipped-tensors"
#: ... how many replies the update screen dropped, and how many it scaled down.
SCREENED_OUT_METRIC = "screened-out-clients"
NORM_BOUNDED_METRIC = "norm-bounded-clients"
#: ... and how many remembered clients (``client_memory``) entered the merge.
REMEMBERED_METRIC = "remembered-clients"
#: Screened-out clients with a cosine below this are logged as warnings, the others at INFO.
SCREEN_WARNING_COSINE = -0.5


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
    fisher : {"sampled", "empirical", "exact", "training"} (default: "sampled")
        The Fisher estimator clients are asked for: labels drawn from the model (the true
        Fisher), true labels, every class weighted by its probability (the true Fisher
        without sampling noise, C times the cost), or the cheap estimate accumulated during
        local training.
    server_fisher : Mapping[str, Tensor], optional
        n_0·F_0, a Fisher (sum) of data the server holds; added to δ in H0 on the server.
    merge : {"ugm", "fisher-averaging", "task-arithmetic"} (default: "ugm")
        The merge rule (``fl_ugm.merge_rules``). The other two are UGM's limits (H0 → 0;
        F ≡ 0), offered as baselines that see exactly the same client training and replies.
    ledger : Ledger or path, optional
        Where to keep, for later client removal, every client's latest contribution (under
        the stable ``client-id`` its reply carries), its summed merge shares, the recent
        global checkpoints and the removed clients (``fl_ugm.ledger``). A ledger written by
        a run with another δ, α, scale, rule or model is refused. Removed clients it lists
        are never sampled again.
    fisher_clip : float or None (default: 3.0)
        The Fisher-inflation defence: a client weights itself by the Fisher it reports, so
        one inflated Fisher would take over the merge. Each round, per parameter tensor,
        each client's per-example Fisher mass ΣF_t / n_t is compared with the (lower) median
        client's; a tensor above ``fisher_clip`` × that median is scaled down to exactly the
        bound. Clips up to ``CLIP_WARNING_RATIO`` × the median are logged at INFO (honest
        clients get there), larger ones as warnings; the round's train metrics count them
        (``FISHER_CLIPPED_METRIC``). ``None`` turns the defence off.
    update_screen : UpdateScreen or None (default: ``UpdateScreen()``, the norm bound)
        The defence against poisoned deltas (``fl_ugm.robust.UpdateScreen``), after the
        Fisher clip: a Δ longer than 3 × the median client's is scaled down to that length;
        with ``UpdateScreen(min_cosine=0.0)`` also a Δ whose cosine with the coordinate-wise
        median of the round's deltas is ≤ 0 is left out (at most ⌊(T − 1)/2⌋ of T clients:
        the defence against flipped updates, off by default for its cost to honest non-IID
        runs, README "Defences against hostile clients"). Both are logged with node and
        client id; the round's train metrics count them (``SCREENED_OUT_METRIC``,
        ``NORM_BOUNDED_METRIC``). The ledger records what was merged: a scaled Δ as scaled,
        a dropped client not at all. Screened-out clients do not count against
        ``min_train_nodes``. ``None`` turns the screen off.
    wire_dtype : {"float16", "float32"} (default: "float16")
        The dtype clients send Δ and F in: "float16" scales each tensor by its largest
        entry (a relative precision of 2⁻¹¹ over 29 binades, so a Fisher's range is kept)
        and makes a reply as large as FedAvg's full-model reply; "float32" doubles it. The
        server decodes to float32 before it merges (``fl_ugm.protocol``).
    server_lr, server_momentum : float (default: 1.0, 0.0)
        η and β of server momentum on the merged update (``fl_ugm.server_optimizer``):
        m_r = β m_{r−1} + (θ⁺_r − θ_{r−1}), θ_r = θ_{r−1} + η m_r, as Flower's FedAvgM does
        for the plain average. The defaults apply the merge as it is (the exact UGM round).
        Replay removal replays the momentum; ``method="eq13"`` removal refuses a run with
        β > 0 or η ≠ 1 (its one-round update assumes each merge was applied as is).
    server_optimizer : {"momentum", "adam"} (default: "momentum")
        "adam": Flower's FedAdam update on the merged step instead (η = ``server_lr``,
        β₁ = ``server_momentum``, β₂ 0.99, τ 1e-3;
        ``fl_ugm.server_optimizer.server_update``). Replay removal replays it too.
    carried_precision : float (default: 0.0)
        γ ∈ [0, 1), a global posterior precision carried across rounds: after round r,
        C_r = γ · (C_{r−1} + Σ_t α_t F_t) (the round's aggregate Fisher, after the clip), and
        round r + 1 uses H0 = δ + C_r per parameter entry, both in the merge and as the
        clients' proximal prior (sent as ``fl_ugm.protocol.PRIOR_RECORD``, float32, one
        tensor per parameter: a second model-sized download). 0 turns it off. Replay
        removal replays C; not combinable with ``client_memory`` yet.
    client_memory : bool (default: False)
        Keep every client's latest merged reply and merge it, re-centred to the current
        global (Δ + F (s − θ) / (H0 + F), ``fl_ugm.client_memory``), in each round the
        client does not reply in: for partial participation. Costs two model-sized tensors
        per client seen. With a ledger it needs every round's history
        (``history_rounds=0``) and a ``client-id`` in every reply (a reply without one is
        dropped), and replay removal replays the memory.
    client_dual_step : float (default: 0.0)
        ρ ≥ 0 of client dual variables (``fl_ugm.client_duals``, FedDyn's drift correction in
        UGM's units): each client keeps λ_t in its node state, trains on
        ℓ_t − ⟨λ_t, w⟩ + ½‖w − θ‖²_P, sends Δ_t − λ_t / (P + F_t) and keeps
        λ_t − ρ·P·Δ_t. The server merges as always (exact on the oracle for any λ; the
        ledger records what was sent). Clients must keep state between rounds
        (``handle_train(..., state=context.state)``). 0 turns it off.
    excluded_clients : iterable of str (default: ())
        Client ids never sampled in this run (e.g. to retrain without them); like removed
        clients, they count against ``min_train_nodes`` and ``min_available_nodes``.
    **fedavg_kwargs
        Passed to ``flwr.serverapp.strategy.FedAvg`` (``fraction_train``,
        ``min_train_nodes``, ``min_available_nodes``, ``weighted_by_key``,
        ``arrayrecord_key``, ``configrecord_key``, ``train_metrics_aggr_fn`` …). Set the
        minimum node counts to the number of clients for full participation in round 1;
        removed and excluded clients are subtracted from both.

    Attributes
    ----------
    current_arrays : dict[str, Tensor] or None
        The global state the current round's clients start from (set by ``configure_train``,
        like Flower's ``FedOpt.current_arrays``); replies are validated against it.
    roster : ClientRoster
        Client id ↔ node id, and the excluded (removed) clients.
    round_offset : int
        Rounds completed before this run (``resume_from_ledger``).
    server_state : tuple of dict[str, Tensor]
        The server optimizer's state after the last round: (m_r,) for momentum, (m_r, v_r)
        for Adam, () for none yet (``momentum`` is m_r, or None).
    carried : dict[str, Tensor] or None
        The carried precision C_r after the last round (None: none yet, or γ = 0).
    memory : ClientMemory or None
        The clients' latest replies (``client_memory``; None when off).

    Notes
    -----
    The reply contract is in ``fl_ugm.protocol``. A reply that fails validation is dropped
    with the reason logged; with fewer valid replies than needed (``min_train_nodes``, or
    every node asked if fewer were) the round keeps the global model.
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
        update_screen: UpdateScreen | None = UpdateScreen(),  # noqa: B008 (frozen)
        wire_dtype: str = "float16",
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        carried_precision: float = 0.0,
        client_memory: bool = False,
        client_dual_step: float = 0.0,
        server_optimizer: str = "momentum",
        excluded_clients: Iterable[str] = (),
        **fedavg_kwargs,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        check_server_optimizer(server_lr, server_momentum)
        if server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"FedUGM: server_optimizer={server_optimizer!r}; choose one of "
                             f"{SERVER_OPTIMIZERS}.")
        if not (math.isfinite(carried_precision) and 0 <= carried_precision < 1):
            raise ValueError(f"FedUGM: carried_precision={carried_precision}; γ must be in "
                             "[0, 1) (0: off).")
        if client_memory and carried_precision:
            raise ValueError("FedUGM: client_memory cannot be combined with carried_precision "
                             "yet (a carried prior changes P between a reply and its "
                             "re-centring); turn one of them off.")
        if not (math.isfinite(client_dual_step) and client_dual_step >= 0):
            raise ValueError(f"FedUGM: client_dual_step={client_dual_step}; ρ must be finite "
                             "and ≥ 0 (0: off).")
        for name, value in (("prior_precision", prior_precision), ("scale", scale)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"FedUGM: {name}={value}; it must be finite and > 0.")
        if alpha not in ALPHA_MODES:
            raise ValueError(f"FedUGM: alpha={alpha!r}; choose one of {ALPHA_MODES}.")
        if fisher not in FISHER_ESTIMATORS:
            raise ValueError(f"FedUGM: fisher={fisher!r}; choose one of {FISHER_ESTIMATORS}.")
        if merge not in MERGE_RULES:
            raise ValueError(f"FedUGM: merge={merge!r}; choose one of {tuple(MERGE_RULES)}.")
        if fisher_clip is not None and not (math.isfinite(fisher_clip) and fisher_clip >= 1):
            raise ValueError(f"FedUGM: fisher_clip={fisher_clip}; it must be ≥ 1, or None.")
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"FedUGM: wire_dtype={wire_dtype!r}; choose one of {WIRE_DTYPES}.")
        self.prior_precision = float(prior_precision)
        self.alpha = alpha
        self.scale = float(scale)
        self.fisher = fisher
        self.server_fisher = dict(server_fisher) if server_fisher is not None else None
        self.rule = merge_rule(merge)
        self.fisher_clip = fisher_clip
        self.update_screen = update_screen
        self.wire_dtype = wire_dtype
        self.server_lr, self.server_momentum = float(server_lr), float(server_momentum)
        self.server_optimizer = server_optimizer
        self._server_step = server_optimizer == "adam" or uses_server_optimizer(
            self.server_lr, self.server_momentum)
        self.server_state: OptimizerState = ()
        self.carried_precision = float(carried_precision)
        self.carried: dict[str, Tensor] | None = None
        self.memory = ClientMemory() if client_memory else None
        self.client_dual_step = float(client_dual_step)
        self.current_arrays: dict[str, Tensor] | None = None
        self.round_offset = 0
        self._nodes_asked = 0  # train messages sent in the current round
        self.ledger = Ledger(ledger) if isinstance(ledger, str | Path) else ledger
        removed: Iterable[str] = ()
        if self.ledger is not None:
            self.ledger.ensure_meta(prior_precision=self.prior_precision, alpha=alpha,
                                    scale=self.scale, merge=merge, server_lr=self.server_lr,
                                    server_momentum=self.server_momentum,
                                    server_optimizer=server_optimizer,
                                    client_memory=client_memory,
                                    carried_precision=self.carried_precision)
            if client_memory and self.ledger.history_rounds:
                raise ValueError(
                    f"FedUGM: client_memory needs a ledger that keeps every round's history "
                    f"(its replay removal rebuilds the memory from it); the ledger at "
                    f"{self.ledger.directory} keeps the last {self.ledger.history_rounds}. "
                    "Open a new ledger with history_rounds=0.")
            if self.server_fisher is not None:
                self.ledger.ensure_prior(self.merge_prior(self.server_fisher))
            removed = self.ledger.removed_clients()
        self.roster = ClientRoster([*excluded_clients, *removed])

    @property
    def merge(self) -> str:
        """The merge rule's name."""
        return self.rule.name

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
        self.rebuild_memory()
        self.carried = None
        history = self.ledger.history()
        # the newest global is the one after the last history round, the rounds since being
        # replay removals (which rewrite the history and end where the replay ends)
        last = history[-1] if history and set(range(history[-1] + 1, round_ + 1)) <= set(
            self.ledger.replay_removal_rounds()) else None
        if self.carried_precision and last is not None:  # C_R from the last merged round
            entry = self.ledger.history_round(last)
            self.carried = carry_precision(
                entry.carried, [p.fisher for p in entry.participants],
                [p.alpha for p in entry.participants], self.carried_precision)
        elif self.carried_precision:
            log(WARNING, "resume: the ledger has no history of round %d; the carried "
                "precision restarts from 0.", round_)
        self.server_state = ()
        if self._server_step and last is not None:
            self.server_state = self._resumed_server_state(last, state)
        elif self._server_step:
            log(WARNING, "resume: the ledger has no history of round %d; the server "
                "%s restarts from 0.", round_, self.server_optimizer)
        return round_, ArrayRecord(state)

    @property
    def momentum(self) -> dict[str, Tensor] | None:
        """The server momentum m_r after the last round (Adam's first moment; None: none)."""
        return self.server_state[0] if self.server_state else None

    def _resumed_server_state(self, round_: int, state: dict[str, Tensor]) -> OptimizerState:
        """The optimizer state after the ledger's round ``round_``: momentum from θ_R =
        θ_{R−1} + η m_R; Adam's from the round's merged step, merged again from its
        history."""
        entry = self.ledger.history_round(round_)
        if not entry.participants:  # a replayed round nobody was left in kept the state
            return entry.server_state
        if self.server_optimizer == "momentum":
            return ({k: (v - entry.start[k]) / self.server_lr for k, v in state.items()
                     if v.is_floating_point()},)
        from fl_ugm.removal import recorded_step

        step = recorded_step(self.ledger, round_, self.replay_prior())
        _, server_state = server_update(
            {k: v.to(state[k].dtype) for k, v in step.items()}, entry.server_state,
            **self._optimizer_options(round_))
        return server_state

    def _optimizer_options(self, server_round: int) -> dict:
        return {"optimizer": self.server_optimizer, "server_lr": self.server_lr,
                "server_momentum": self.server_momentum, "server_round": server_round}

    def rebuild_memory(self) -> None:
        """With ``client_memory`` and a ledger: the memory as the ledger's history leaves
        it (each client's latest reply and the global it started from), after a resume or
        a removal that rewrote the history. Replies come back in the history's dtype."""
        if self.memory is None or self.ledger is None:
            return
        self.memory = ClientMemory()
        for round_ in self.ledger.history():
            entry = self.ledger.history_round(round_)
            self.memory.remember(round_, entry.start, [
                (p.client_id, p.delta, p.fisher, p.num_examples) for p in entry.participants
                if p.client_id is not None and p.client_id not in self.roster.excluded])

    def summary(self) -> None:
        """Log the UGM settings, then FedAvg's."""
        log(INFO, "\t├──> UGM merge (rule: %s):", self.merge)
        log(INFO, "\t│\t├── Prior precision δ: %g%s", self.prior_precision,
            " (+ server Fisher)" if self.server_fisher is not None else "")
        log(INFO, "\t│\t├── Alpha: %s × scale %g", self.alpha, self.scale)
        log(INFO, "\t│\t├── Client Fisher estimator: %s; replies in %s", self.fisher,
            self.wire_dtype)
        if self.carried_precision:
            log(INFO, "\t│\t├── Carried precision: γ %g", self.carried_precision)
        if self.memory is not None:
            log(INFO, "\t│\t├── Client memory: every client's latest reply, re-centred")
        if self.client_dual_step:
            log(INFO, "\t│\t├── Client dual variables: ρ %g", self.client_dual_step)
        if self._server_step:
            log(INFO, "\t│\t├── Server %s on the merged update: η %g, β %g",
                self.server_optimizer, self.server_lr, self.server_momentum)
        log(INFO, "\t│\t├── Fisher-inflation clip: %s", "off" if self.fisher_clip is None
            else f"{self.fisher_clip:g} × the median client's per-example Fisher mass")
        log(INFO, "\t│\t├── Update screen: %s", self.update_screen or "off")
        log(INFO, "\t│\t└── Ledger: %s; excluded clients: %s",
            self.ledger.directory if self.ledger else "none",
            ", ".join(sorted(self.roster.excluded)) or "none")
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global; ask the sampled clients (never an excluded one) for a UGM
        reply. Excluded clients count against the minimum node counts."""
        server_round += self.round_offset
        self.current_arrays = arrays.to_torch_state_dict()
        if self.ledger is not None and server_round - 1 not in self.ledger.rounds():
            self.ledger.record_global(server_round - 1, self.current_arrays)
        if self.fraction_train == 0.0:
            return []
        eligible = self.roster.eligible(grid)
        left_out = len(self.roster.excluded)
        sample_size = max(int(len(eligible.get_node_ids()) * self.fraction_train),
                          self.min_train_nodes - left_out)
        node_ids, candidates = sample_nodes(eligible, self.min_available_nodes - left_out,
                                            sample_size)
        log(INFO, "configure_train: Sampled %d nodes (out of %d%s)", len(node_ids),
            len(candidates), f"; {left_out} excluded clients left out" if left_out else "")
        config = ugm_train_config(config, fisher=self.fisher,
                                  prior_precision=self.prior_precision,
                                  wire_dtype=self.wire_dtype, dual_step=self.client_dual_step)
        config["server-round"] = server_round
        self._nodes_asked = len(node_ids)
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self.carried is not None:  # the clients' per-coordinate prior δ + C
            record[PRIOR_RECORD] = ArrayRecord(
                {k: self.prior_precision + c for k, c in self.carried.items()})
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Parse and check the replies, drop bad ones, merge the rest, record the round."""
        if self.current_arrays is None:
            raise RuntimeError("FedUGM.aggregate_train called before configure_train.")
        server_round += self.round_offset
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        updates, dropped = parse_ugm_replies(valid, self.current_arrays,
                                             weighted_by_key=self.weighted_by_key)
        # replies arrive in whatever order the nodes finished; merging them in client order
        # makes a round's float32 sums, and so a whole run, reproducible from its seed
        updates.sort(key=lambda u: (u.client_id is None, u.client_id or "", u.node_id))
        updates = self._admit(updates, dropped)
        clipped = self._clip_fisher(server_round, updates)
        needed = self._replies_needed()
        screened = self._screen(server_round, updates, needed)
        screened_out = screened[0] if screened else 0
        merged = self._merge(updates, dropped, max(needed - screened_out, 1))
        for reply in dropped:
            log(WARNING, "aggregate_train: dropping node %d in round %d%s: %s", reply.node_id,
                server_round, _who(reply.client_id), reply.reason)
        if merged is None:
            log(WARNING, "aggregate_train: round %d has %d valid UGM replies, fewer than the "
                "%d needed (min_train_nodes=%d); keeping the global model.", server_round,
                len(updates), needed, self.min_train_nodes)
            return None, None
        new_state, remembered, alphas, shares = merged
        # the optimizer state moves only once the round is recorded; the ledger's history
        # keeps the state the round started from
        server_state = self.server_state
        if self._server_step:
            new_state, server_state = server_step(self.current_arrays, new_state, server_state,
                                                  **self._optimizer_options(server_round))
        if self.ledger is not None:
            self._record(server_round, updates, remembered, alphas, shares, new_state)
        self.server_state = server_state
        if self.memory is not None:
            self.memory.remember(server_round, self.current_arrays, [
                (_memory_key(u), u.delta, u.fisher, u.num_examples) for u in updates])
        if self.carried_precision:  # C_r = γ (C_{r−1} + Σ α_t F_t)
            self.carried = carry_precision(self.carried, [u.fisher for u in updates],
                                           alphas, self.carried_precision)
        metrics = self.train_metrics_aggr_fn([u.content for u in updates], self.weighted_by_key)
        if clipped is not None:
            metrics[FISHER_CLIPPED_METRIC] = clipped
        if screened is not None:
            metrics[SCREENED_OUT_METRIC], metrics[NORM_BOUNDED_METRIC] = screened
        if self.memory is not None:
            metrics[REMEMBERED_METRIC] = len(remembered)
        return ArrayRecord(new_state), metrics

    def remove(self, grid: Grid, client_id: str, **options) -> tuple[ArrayRecord, dict]:
        """Remove ``client_id`` from the newest global in the ledger, then run repair rounds
        without it: :func:`fl_ugm.server_removal.remove_client` (its options: ``mode``,
        ``repair_rounds``, ``train_config``, ``evaluate_fn``, ``timeout``)."""
        from fl_ugm.server_removal import remove_client

        return remove_client(self, grid, client_id, **options)

    def merge_prior(self, keys: Iterable[str], *, carried: bool = True) -> PriorPrecision:
        """H0 for the tensors ``keys``: δ, plus per tensor the server Fisher and (unless
        ``carried=False``) the carried precision where the run has them."""
        keys = list(keys)
        missing = [k for k in keys if self.server_fisher is not None
                   and k not in self.server_fisher]
        if missing:
            raise ValueError(f"FedUGM: server_fisher has no entry for {missing[:5]}.")
        prior = self.prior_precision if self.server_fisher is None else {
            k: self.prior_precision + self.server_fisher[k] for k in keys}
        return with_carried(prior, self.carried) if carried else prior

    def replay_prior(self) -> PriorPrecision:
        """The H0 the ledger's rounds are merged again with: the run's δ (+ server Fisher)
        through its merge rule, without the carried precision (the history holds each
        round's)."""
        return self.rule.prior(self.merge_prior(self.server_fisher or (), carried=False))

    # ------------------------------------------------------------------ steps of a round

    def _admit(self, updates: list[ClientUpdate], dropped: list[DroppedReply]
               ) -> list[ClientUpdate]:
        """Learn which node serves which client; drop the replies of excluded clients and
        a second reply under a client id already seen this round."""
        admitted, seen = [], {}
        for update in updates:
            client = update.client_id
            if client is None and self.memory is not None and self.ledger is not None:
                dropped.append(DroppedReply(update.node_id, None, (
                    "it sent no client-id, and with client_memory and a ledger a client must "
                    "be known by a stable id across rounds (pass client_id to "
                    "fl_ugm.client.handle_train).")))
                continue
            if client is None:
                admitted.append(update)
                continue
            if client in seen:
                reason = f"node {seen[client]} already replied as client {client!r} this round."
            else:
                seen[client] = update.node_id
                self.roster.learn(client, update.node_id)
                if client not in self.roster.excluded:
                    admitted.append(update)
                    continue
                reason = f"client {client!r} was removed or excluded from this run; its reply " \
                         "is ignored."
            dropped.append(DroppedReply(update.node_id, client, reason))
        return admitted

    def _clip_fisher(self, server_round: int, updates: list[ClientUpdate]) -> int | None:
        """The Fisher-inflation defence (``fisher_clip``): logs every clipped tensor and
        returns how many were clipped (None when the defence is off or moot)."""
        if self.fisher_clip is None or not self.rule.uses_fisher:
            return None
        fishers, clipped = clip_fisher_inflation(
            [u.fisher for u in updates], [u.num_examples for u in updates], self.fisher_clip)
        for update, fisher in zip(updates, fishers, strict=True):
            update.fisher = fisher
        for index, key, ratio in clipped:
            update = updates[index]
            level = WARNING if ratio > CLIP_WARNING_RATIO else INFO
            log(level, "aggregate_train: node %d%s in round %d reports a Fisher on '%s' %.3g× "
                "the median client's (per example); scaled down to %g×.", update.node_id,
                _who(update.client_id), server_round, key, ratio, self.fisher_clip)
        return len(clipped)

    def _replies_needed(self) -> int:
        """min_train_nodes, or every node asked when fewer were (after removals)."""
        return max(min(self.min_train_nodes, self._nodes_asked or self.min_train_nodes), 1)

    def _screen(self, server_round: int, updates: list[ClientUpdate], needed: int
                ) -> tuple[int, int] | None:
        """The update screen (``update_screen``): scales long deltas down and removes the
        screened-out clients from ``updates``, logging each; returns (how many left out, how
        many scaled), or None when the screen is off or the round is short of valid replies
        anyway."""
        if self.update_screen is None or not updates or len(updates) < needed:
            return None
        deltas, verdicts = self.update_screen([u.delta for u in updates],
                                              list(updates[0].fisher))
        kept = []
        for update, delta, verdict in zip(updates, deltas, verdicts, strict=True):
            if verdict.scale < 1:
                update.delta = delta
                log(INFO, "aggregate_train: node %d%s in round %d sent a Δ %.3g× the median "
                    "client's norm; scaled down to %g×.", update.node_id,
                    _who(update.client_id), server_round, verdict.norm_ratio,
                    self.update_screen.norm_bound)
            if not verdict.dropped:
                kept.append(update)
                continue
            reason = (f"update screen: its Δ has cosine {verdict.cosine:.3f} with the round's "
                      f"median Δ (≤ {self.update_screen.min_cosine:g}: it points away from what "
                      "most clients ask for)")
            # honest non-IID clients reach −0.4 (13–15 % of client-rounds are screened out in
            # the attack benchmark's honest runs): below SCREEN_WARNING_COSINE, a warning
            log(WARNING if verdict.cosine < SCREEN_WARNING_COSINE else INFO,
                "aggregate_train: leaving out node %d%s in round %d: %s.", update.node_id,
                _who(update.client_id), server_round, reason)
        updates[:] = kept
        return (sum(v.dropped for v in verdicts), sum(v.scale < 1 for v in verdicts))

    def _merge(self, updates: list[ClientUpdate], dropped: list[DroppedReply], needed: int):
        """(new state, remembered, alphas, shares) of the valid updates, then, with
        ``client_memory``, the ``remembered`` clients that did not reply (re-centred; their
        alphas and shares follow the updates'), or None if fewer than ``needed`` updates
        remain. A client whose values the merge rejects (NaN, Inf, negative Fisher) is moved
        from ``updates`` to ``dropped`` and the rest are merged again."""
        while len(updates) >= needed:
            prior = self.merge_prior(updates[0].fisher)
            remembered = self._remembered(updates, prior)
            merged = updates + remembered
            sizes = [u.num_examples for u in merged]
            alphas = client_alphas(sizes, self.alpha, self.scale)
            try:
                state, shares = merge_round(
                    self.rule, self.current_arrays, [u.delta for u in merged],
                    [u.fisher for u in merged], sizes, alphas=alphas, prior_precision=prior,
                    with_shares=self.ledger is not None)  # fmt: skip
            except InvalidClientInput as err:
                if err.client_index is None or err.client_index >= len(updates):
                    raise
                bad = updates.pop(err.client_index)
                dropped.append(DroppedReply(bad.node_id, bad.client_id, str(err)))
                continue
            return state, remembered, alphas, shares
        return None

    def _remembered(self, updates: list[ClientUpdate], prior: PriorPrecision
                    ) -> list[ClientUpdate]:
        """The remembered clients that did not reply this round (none without
        ``client_memory``), their Δ re-centred to the current global under the merge
        rule's H0 (not at all for a rule that ignores the Fisher)."""
        if self.memory is None:
            return []
        skip = {_memory_key(u) for u in updates} | self.roster.excluded
        prior = self.rule.prior(prior) if self.rule.uses_fisher else None
        return [ClientUpdate(-1, client, n, delta, fisher, RecordDict())
                for client, delta, fisher, n in self.memory.recentred(
                    self.current_arrays, prior, skip)]

    def _record(self, server_round: int, updates: list[ClientUpdate],
                remembered: list[ClientUpdate], alphas: list[float],
                shares: list[dict[str, Tensor]], new_state: dict[str, Tensor]) -> None:
        """The merged round into the ledger (contributions, history with the server
        optimizer's state the round started from and the remembered clients merged, new
        global), as one commit."""
        for update in updates:
            if update.client_id is None:
                log(WARNING, "ledger: node %d sent no client-id; its contribution enters the "
                    "history but it cannot be removed later (pass client_id to "
                    "fl_ugm.client.handle_train).", update.node_id)
        self.ledger.record_round(server_round, [
            Contribution(u.client_id, u.num_examples, a, u.delta, u.fisher, share)
            for u, a, share in zip(updates, alphas, shares[:len(updates)], strict=False)],
            new_state, start_global=self.current_arrays, server_state=self.server_state,
            carried=self.carried, remembered=[
                Remembered(u.client_id, self.memory.replies[u.client_id].reply_round, a)
                for u, a in zip(remembered, alphas[len(updates):], strict=True)])  # fmt: skip
        rounds = self.ledger.history()
        log(INFO, "ledger: round %d recorded; history %.1f MB (%d rounds, %s)", server_round,
            self.ledger.history_bytes() / 1e6, len(rounds), self.ledger.history_dtype)


def _memory_key(update: ClientUpdate) -> str:
    """The client memory's key: the client id, or the node's where the reply sent none."""
    return update.client_id if update.client_id is not None else f"node {update.node_id}"


def _who(client_id: str | None) -> str:
    return f" (client {client_id!r})" if client_id else ""
