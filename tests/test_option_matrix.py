"""The option matrix (docs/design.md §2): every pair of FedUGM's options, and the triples
the results pages recommend, either trains, resumes and replay-removes exactly on the
linear-regression oracle (DESIGN §1), or is refused at construction with an error naming the pair.

The oracle: 6 clients that observe one model, half of them sampled per round, non-uniform n,
a Fisher that grows with n (so the Fisher clip stays idle, and a check guards it), and a
coordinate only client p2's data informs (its removal is real). With the update screen on
their observations are noiseless: clients that agree exactly give the screen nothing to do
(checked), where a screened round would make "the protocol without p2" another protocol.
Each combination runs against its own reference: the same protocol (the same sampled
clients, p2 left out where removed) computed in closed form.
"""

from __future__ import annotations

import itertools
import random
import shutil

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from helpers import LinearGrid

from fl_ugm import FedUGM
from fl_ugm.admission import FISHER_CLIPPED_METRIC, NORM_BOUNDED_METRIC, SCREENED_OUT_METRIC
from fl_ugm.engine import RunSettings
from fl_ugm.ledger import Ledger
from fl_ugm.removal import remove_from_ledger
from fl_ugm.robust import UpdateScreen

pytestmark = pytest.mark.usefixtures("server_identity")

OPTIONS = {
    "memory": {"client_memory": True},
    "carried": {"carried_precision": 0.5},
    "momentum": {"server_lr": 0.8, "server_momentum": 0.5},
    "adam": {"server_optimizer": "adam", "server_lr": 0.05, "server_momentum": 0.7},
    "duals": {"client_dual_step": 1.0},
    "screen": {"update_screen": UpdateScreen(norm_bound=3.0, min_cosine=0.0)},
    "bfloat16": {},  # the ledger's history dtype (a storage option, not FedUGM's)
    "defaults": {},  # FedUGM's own defaults (half the clients a round: the memory is on)
}
#: What a combination does not turn on is off (FedUGM's defaults are a combination too).
OFF = {"server_momentum": 0.0, "client_memory": False, "update_screen": None}
#: Server momentum and FedAdam's update are two values of one setting (server_optimizer).
SAME_SETTING = {frozenset({"momentum", "adam"})}
REFUSED = {frozenset({"memory", "carried"}): r"client_memory cannot be combined with "
                                             r"carried_precision.*turn one of them off"}
#: The recipes of docs/results-*.md: Fashion-MNIST (memory + momentum) and MNIST-5k with one
#: local epoch (duals + momentum), each with the default screen on; and the memory with a
#: compact history.
RECOMMENDED = [("memory", "momentum", "screen"), ("duals", "momentum", "screen"),
               ("memory", "momentum", "bfloat16"), ("defaults",), ("defaults", "bfloat16")]
COMBINATIONS = [c for c in itertools.combinations(set(OPTIONS) - {"defaults"}, 2)
                if frozenset(c) not in SAME_SETTING] + RECOMMENDED
CLIENTS, REMOVED, SIZES = 6, 2, [10, 12, 14, 16, 18, 20]
#: δ, large next to the clients' Fishers: each round moves the global a fraction of the way,
#: so the clients' deltas stay comparable in norm and direction over the whole run.
PRIOR = 20.0
#: A bfloat16 history keeps 8 bits of each stored Δ and F: a replay from it is exact to that
#: precision only (training and resume never read the history's deltas).
BFLOAT16_REPLAY_TOLERANCE = 2e-2


def agreeing_problem(seed: int, noise: float):
    """Hessians (a Fisher: a sum, ∝ n) and Xᵀy of clients observing one model θ* with
    ``noise``, the coordinate 0 informed by p2 alone, and θ0 (near θ* in that coordinate, so
    p2's delta never dwarfs the others')."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    theta_star = draw(5)
    hessians = [n * (0.35 + 0.1 * torch.rand(5, generator=gen, dtype=torch.float64))
                for n in SIZES]
    xty = [h * theta_star + noise * n**0.5 * draw(5) for h, n in zip(hessians, SIZES)]
    for t in range(CLIENTS):
        if t != REMOVED:
            hessians[t][0] = xty[t][0] = 0.0
    theta0 = theta_star + 1.5 * draw(5)
    theta0[0] = theta_star[0] + 0.3
    return hessians, xty, theta0


def protocol(settings: RunSettings, participation: list[list[int]], left_out, hessians, xty,
             theta0):
    """θ and the server state after the rounds, each merging its sampled clients but
    ``left_out`` (with the memory: every client seen so far), as design.md §1 defines each
    option (round 7 is the removal's, so the 7th round trained is round 8); client duals
    change nothing here (the corrected Δ' is the plain Δ on a quadratic)."""
    memory, gamma = settings.client_memory, settings.carried_precision
    optimizer = settings.server_optimizer
    lr, beta = settings.server_lr, settings.server_momentum
    theta, carried, first, second, seen = theta0, torch.zeros_like(theta0), None, 0.0, set()
    for index, sampled in enumerate(participation, 1):
        server_round = index if index < 7 else index + 1  # Adam's bias correction reads it
        kept = [t for t in sampled if t not in left_out]
        if not kept:
            continue
        seen |= set(kept)
        merged = sorted(seen) if memory else kept
        alphas = {t: SIZES[t] / sum(SIZES[u] for u in merged) for t in merged}
        prior = PRIOR + carried
        target = (prior * theta + sum(alphas[t] * xty[t] for t in merged)) / (
            prior + sum(alphas[t] * hessians[t] for t in merged))
        carried = gamma * (carried + sum(alphas[t] * hessians[t] for t in kept))
        step = target - theta
        if optimizer == "adam":
            first = (1 - beta) * step + (0 if first is None else beta * first)
            second = 0.99 * second + 0.01 * step**2
            rate = lr * (1 - 0.99 ** (server_round + 1)) ** 0.5 / (1 - beta ** (server_round + 1))
            theta = theta + rate * first / (second**0.5 + 1e-3)
        else:
            first = step + (0 if first is None else beta * first)
            theta = theta + lr * first
    return theta, carried, first


def run_rounds(strategy: FedUGM, grid, theta, rounds: int, first_round: int, screened: bool):
    arrays = ArrayRecord({"w": theta})
    for server_round in range(first_round, first_round + rounds):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        arrays, metrics = strategy.aggregate_train(server_round,
                                                   grid.send_and_receive(messages))
        assert metrics.get(FISHER_CLIPPED_METRIC, 0) == 0  # the oracle gives defences no work
        if screened:
            assert (metrics[SCREENED_OUT_METRIC], metrics[NORM_BOUNDED_METRIC]) == (0, 0)
    return arrays.to_torch_state_dict()["w"]


@pytest.mark.parametrize("combination", COMBINATIONS, ids="+".join)
def test_every_pair_of_options_is_exact_on_the_oracle_or_refused(combination, tmp_path):
    options = {} if "defaults" in combination else dict(OFF)
    options.update({k: v for name in combination for k, v in OPTIONS[name].items()})
    refusal = next((why for pair, why in REFUSED.items() if pair <= set(combination)), None)
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            FedUGM(**options)
        return
    history_dtype = "bfloat16" if "bfloat16" in combination else "as-sent"
    screened = "screen" in combination or "defaults" in combination
    hessians, xty, theta0 = agreeing_problem(seed=21, noise=0.0 if screened else 0.3)
    grid = LinearGrid(hessians, xty, sizes=SIZES)

    def strategy(directory=tmp_path) -> FedUGM:
        return FedUGM(prior_precision=PRIOR, fraction_train=0.5, min_train_nodes=2,
                      min_available_nodes=CLIENTS, **options,
                      ledger=Ledger(directory, history_dtype=history_dtype))

    settings = strategy(tmp_path.parent / f"{tmp_path.name}-settings").settings
    if "defaults" in combination:  # the memory and server momentum 0.5, the norm screen
        assert settings.client_memory and settings.server_momentum == 0.5
        assert settings.update_screen is not None

    def reference(participation, left_out=()):
        return protocol(settings, participation, left_out, hessians, xty, theta0)

    # trains: three rounds, then a server restarted on the ledger trains three more
    random.seed(7)
    first = run_rounds(strategy(), grid, theta0, 3, 1, screened)
    torch.testing.assert_close(first, reference(grid.participation())[0], rtol=0, atol=1e-10)
    resumed = strategy()
    assert resumed.resume_from_ledger()[0] == 3
    trained = run_rounds(resumed, grid, first, 3, 1, screened)
    participation = grid.participation()
    assert 0 < sum(REMOVED in s for s in participation) < 6  # partial participation
    theta, carried, momentum = reference(participation)
    torch.testing.assert_close(trained, theta, rtol=0, atol=1e-8)
    if settings.carried_precision:
        torch.testing.assert_close(resumed.state.carried["w"], carried, rtol=0, atol=1e-8)
    if settings.moves_by_optimizer:
        torch.testing.assert_close(resumed.state.optimizer[0]["w"], momentum, rtol=0,
                                   atol=1e-8)

    # replay-removes: through the ledger alone, then through FedUGM.remove
    without = reference(participation, {REMOVED})[0]
    assert (without - trained).abs().max() > 1e-2  # p2's influence was real
    tolerance = BFLOAT16_REPLAY_TOLERANCE if history_dtype == "bfloat16" else 1e-8
    state, _ = remove_from_ledger(Ledger(tmp_path), f"p{REMOVED}", recentring=1.0,
                                  shared_rank=0)
    torch.testing.assert_close(state["w"], without, rtol=0, atol=tolerance)
    remover = strategy()
    arrays, _ = remover.remove(grid, f"p{REMOVED}", recentring=1.0, shared_rank=0)
    torch.testing.assert_close(arrays.to_torch_state_dict()["w"], without, rtol=0,
                               atol=tolerance)
    # a server restarted right after the removal (on a copy of the ledger) holds the
    # remover's state, and both continue exactly as the protocol without p2 does
    shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-copy")
    restarted = strategy(tmp_path.parent / f"{tmp_path.name}-copy")
    assert restarted.resume_from_ledger()[0] == 7
    assert_same_state(restarted.state, remover.state)
    removed = arrays.to_torch_state_dict()["w"]
    random.seed(8)
    after_remover = run_rounds(remover, grid, removed, 1, 1, screened)  # round 1 follows
    participation += grid.participation()[-1:]
    random.seed(8)
    after_restart = run_rounds(restarted, grid, removed, 1, 1, screened)
    torch.testing.assert_close(after_restart, after_remover, rtol=0, atol=1e-10)
    if history_dtype == "as-sent":
        continued = reference(participation, {REMOVED})[0]
        torch.testing.assert_close(after_remover, continued, rtol=0, atol=1e-8)
    # the rewritten history replays too: removing p0 from it as well
    state, _ = remove_from_ledger(Ledger(tmp_path), "p0", recentring=1.0, shared_rank=0)
    both = reference(participation, {REMOVED, 0})[0]
    torch.testing.assert_close(state["w"], both, rtol=0, atol=tolerance)


def assert_same_state(resumed, live):
    torch.testing.assert_close(resumed.global_state["w"], live.global_state["w"], rtol=0,
                               atol=0)
    assert len(resumed.optimizer) == len(live.optimizer)
    for part, expected in zip(resumed.optimizer, live.optimizer, strict=True):
        torch.testing.assert_close(part["w"], expected["w"], rtol=0, atol=1e-12)
    assert (resumed.carried is None) == (live.carried is None)
    if live.carried is not None:
        torch.testing.assert_close(resumed.carried["w"], live.carried["w"], rtol=0, atol=1e-12)
    assert resumed.memory.rounds == live.memory.rounds
    assert set(resumed.memory.sums) == set(live.memory.sums)
    for key, total in live.memory.sums.items():  # the same sums, rebuilt from the ledger
        torch.testing.assert_close(resumed.memory.sums[key], total, rtol=1e-12, atol=1e-12)
