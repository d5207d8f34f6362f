"""Remove one client after FL, by each method, and compare with retraining without it.

    python -m simulations.unlearn                         # scenario=corner, configs/unlearn.yaml
    python -m simulations.unlearn scenario=all            # every scenario, out/<scenario>/
    python -m simulations.unlearn scenario=checker seeds=[0] methods=[none,replay,retrain]
    python -m simulations.unlearn --help                  # every key, with defaults

Per seed: FedUGM trains all clients on Ray (Flower simulation of ``simulations.flower_app``)
with a ledger (every round's history) while partition ``forget-client`` is, by
``scenario`` (:data:`SCENARIOS`):

* ``corner``: a backdoor: a 4×4 white square in the bottom-right corner (pixels blank in every
  digit) on all its examples, relabelled ``backdoor-target``;
* ``checker``: a 6×6 checkerboard in the centre of the image, on pixels most digits use;
* ``plus``: a 5×5 plus sign near the top-left corner (a trigger the replay's defaults were
  not chosen on);
* ``label-flip``: its examples of its most common class relabelled as the next class;
* ``honest``: an honest client that asks to be forgotten.

Then it is removed by each method (:data:`METHODS`):

* ``none``: keep the trained model;
* ``ta-negation``: θ − α_t Δ_t with its stored delta (task-arithmetic negation);
* ``eq13-offline``: Eq. 13 alone from the ledger (re-centred), without the revert of
  uninformed coordinates;
* ``ugm-offline`` / ``ugm-online``: ``FedUGM.remove(method="eq13")`` in a Flower removal run
  on a copy of the ledger (Eq. 13 + revert), from the ledger alone or with a fresh Δ_t, F_t
  from the client; ``ugm-repair`` / ``ugm-online-repair``: the same then one FL round of the
  remaining clients (``repair-rounds=1``), in the same Flower run;
* ``replay`` / ``replay-repair``: ``FedUGM.remove(method="replay")``: the training recomputed
  from the ledger's history without the client, with every remaining delta re-centred
  (``fl_ugm.replay``); no client trains; then as many repair rounds as the correction
  budget pays for (at least one);
* ``replay-derived``: the replay with the derivation's re-centring (κ = 1, no shared-rank
  heuristic), from the ledger; no client trains;
* ``replay-early`` / ``-periodic`` / ``-largest-drift`` / ``-final`` /
  ``-early-calibrated`` (:data:`CORRECTED`): ``FedUGM.remove(method="replay",
  mode="online")``: the replay corrected by the remaining clients' exact updates in the
  rounds the policy picks, within ``correction-budget`` × retraining's client trainings
  (``-early-calibrated``: their secant calibration of the other rounds too);
* ``subtract-applied``: subtract everything the merges added on the client's behalf over all
  its rounds (the ledger's running sum);
* ``federaser``: FedEraser (``simulations.federaser``): the stored updates of every
  ``federaser-interval``-th round, calibrated by ``federaser-epochs`` of training by the
  remaining clients; ``federaser-matched``: every round its share of the correction budget
  reaches, with full local epochs (the corrected replay's client trainings);
* ``retrain``: FL from scratch without the client, same rounds (FedUGM never samples it),
  with the training's local seeds.

For each: test accuracy; the attack's success rate (``attack_success``: triggered test
images not of the target class classified as the target; for the label flip, test images of
the source class classified as the target; 0 for the honest client); agreement with the
retrained models' test predictions (the fraction that match, and the mean KL divergence
KL(retrained ‖ method) of the predictive distributions, each a mean over the references); on
the removed client's own training examples, accuracy and mean loss; a loss-threshold
membership-inference advantage (the best TPR − FPR of "loss below a threshold" between those
examples and held-out test examples with the same label mix); L2 distance to the retrained
weights (drift between nets trained from one start is about as large for every method: a
poor yardstick); seconds of server-side work; client trainings (fine-tuning jobs of the
clients) and client epochs.

The reference is retraining's distribution: ``retrains`` more retrains with other local
seeds (``local-seed``). Every method, ``retrain`` included, is judged against them: accuracy,
attack success and agreement as above, and **indistinguishable** (1/0) on a seed when its
accuracy is within the references' min–max ± 0.5 point, its attack success ≤ their max + 2
points and its mean agreement with them ≥ their mutual agreement − 1 point.

Writes ``unlearn.json`` (``{"default": "<the library's default removal, with its default
repair rounds>", "scenario": ..., "methods": {name: {metric: [one per seed]}},
"references": [per seed: the retrains' accuracy range, attack max, mutual agreement],
"config": {...}}``), ``unlearn.md`` (the tables: means, and indistinguishability per seed)
and ``unlearn.png`` to ``out`` (to ``out/<scenario>/`` for ``scenario=all``), and prints the
tables per scenario.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fl_ugm.ledger import Ledger, write_atomically
from fl_ugm.removal import remove_from_ledger, subtract_applied
from fl_ugm.replay import CORRECTION_POLICIES
from simulations import runner
from simulations.adversaries import TRIGGERS, backdoor_success, flip_classes, poisoned
from simulations.federaser import federaser_server_app
from simulations.flower_app import client_partition, experiment_for, fresh_model
from simulations.runner import mean_std, plain, progress

UNLEARN_CONFIG = runner.CONFIGS / "unlearn.yaml"
SCENARIOS = ("corner", "checker", "plus", "label-flip", "honest")
#: The replay corrected by the remaining clients (``FedUGM.remove(mode="online")``), one row
#: per policy, and the early policy with the secant calibration too.
CORRECTED = {**{f"replay-{p}": (p, False) for p in CORRECTION_POLICIES},
             "replay-early-calibrated": ("early", True)}
METHODS = ("none", "ta-negation", "eq13-offline", "ugm-offline", "ugm-online", "ugm-repair",
           "ugm-online-repair", "replay", "replay-repair", "replay-derived", *CORRECTED,
           "subtract-applied", "federaser", "federaser-matched", "retrain")
#: The library's default removal (``FedUGM.remove``'s method and repair rounds) as a row.
DEFAULT_METHOD = "replay"
METRICS = ("test_accuracy", "attack_success", "agreement", "kl_to_retrain", "removed_accuracy",
           "removed_loss", "mia_advantage", "dist_to_retrain", "indistinguishable", "seconds",
           "client_trainings", "client_epochs")
#: A removal is indistinguishable from retraining on a seed when its test accuracy is within
#: the reference retrains' min–max widened by ACCURACY_SLACK, its attack success at most
#: their max + ATTACK_SLACK, and its mean agreement with them at least their mutual agreement
#: − AGREEMENT_SLACK (fractions).
ACCURACY_SLACK, ATTACK_SLACK, AGREEMENT_SLACK = 0.005, 0.02, 0.01
#: FedUGM.remove runs: (method, mode) → (name of the removal row, name of the repaired row)
REMOVAL_RUNS = {("eq13", "offline"): ("ugm-offline", "ugm-repair"),
                ("eq13", "online"): ("ugm-online", "ugm-online-repair"),
                ("replay", "offline"): ("replay", "replay-repair")}


def scenario_config(cfg: dict, scenario: str, seed: int) -> dict:
    """The run config of one seed, with the client to forget (``forget-client``; -1: the
    partition with the most examples) playing ``scenario``'s part."""
    cfg = {**cfg, "seed": seed, "strategy": "fedugm"}
    client = int(cfg["forget-client"])
    if client < 0:
        client = int(max(enumerate(experiment_for(cfg)[3]), key=lambda p: len(p[1]))[0])
    roles = {trigger: {"backdoor-client": client, "backdoor-trigger": trigger}
             for trigger in TRIGGERS}
    roles.update({"label-flip": {"flip-client": client}, "honest": {}})
    return {**cfg, "backdoor-client": -1, "flip-client": -1, **roles[scenario],
            "forget-client": client, "scenario": scenario}


def simulate_to(cfg: dict, label: str, server_app=None, **overrides):
    """One Flower simulation on Ray; returns (final global state, the run's history)."""
    run_config = {**cfg, **overrides}
    history = runner.simulate(run_config, label=label, server_app=server_app)
    return load_file(str(run_config["save-final"])), history


#: Keys that say who plays which part, or what the evaluation does: a retrain never runs the
#: removed client, so it does not depend on them, and one seed's retrains serve every
#: scenario (``retrain-cache``).
NOT_IN_RETRAINS = ("scenario", "backdoor-client", "flip-client", "backdoor-trigger",
                   "backdoor-target", "flip-source", "flip-target", "methods", "retrains",
                   "correction-budget", "federaser-interval", "federaser-epochs",
                   "keep-ledgers", "seeds", "out", "save-final", "retrain-cache")


def retrain(cfg: dict, label: str, **overrides):
    """``simulate_to`` of a retrain, reused from ``retrain-cache`` (a directory; "" = off)
    when a retrain of the same run config was stored there."""
    cache = str(cfg.get("retrain-cache", ""))
    run = {k: v for k, v in {**cfg, **overrides}.items() if k not in NOT_IN_RETRAINS}
    key = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()
    stored = Path(cache) / f"{key[:24]}.safetensors" if cache else None
    if stored is not None and stored.exists():
        progress(f"{label}: reused from {stored}")
        shutil.copyfile(stored, overrides["save-final"])
        return load_file(str(stored)), json.loads(stored.with_suffix(".json").read_text())
    state, history = simulate_to(cfg, label, **overrides)
    if stored is not None:
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(stored.with_suffix(".json"), lambda tmp: tmp.write_text(
            json.dumps(history)))
        write_atomically(stored, lambda tmp: shutil.copyfile(overrides["save-final"], tmp))
    return state, history


def client_work(history: dict, key: str = "replies") -> int:
    """Fine-tuning jobs the clients ran in a Flower run: train replies over all its rounds
    (``key="removal_requests"``: the online-removal requests)."""
    return sum(len(r["nodes"]) for r in history.get(key, []))


def ledger_copy(ledger_dir: Path, name: str, work: Path) -> Path:
    copy = work / f"ledger-{name}"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ledger_dir, copy)
    return copy


def removal_run(cfg: dict, ledger_dir: Path, method: str, mode: str, work: Path, *,
                repair_rounds: int = 1, name: str | None = None, **options):
    """A removal-only Flower run on a copy of the ledger: FedUGM.remove then
    ``repair_rounds`` repair rounds (``options``: more run-config keys, e.g. the replay's
    corrections). Returns (removed state, repaired state, report, client trainings of the
    removal, of the repair rounds)."""
    name = name or f"{method}-{mode}"
    copy = ledger_copy(ledger_dir, name, work)
    label = f"{name} removal" + (f" + {repair_rounds} repair round(s)" if repair_rounds else "")
    repaired, history = simulate_to(cfg, label, **{
        "num-server-rounds": 0, "ledger": str(copy), "remove-client": str(cfg["forget-client"]),
        "removal-method": method, "removal-mode": mode, "repair-rounds": repair_rounds,
        "keep-globals": max(3, repair_rounds + 1),  # the removal's global outlives the repairs
        "out": str(work / name), "save-final": str(work / f"{name}-repair.safetensors"),
        **options})
    report = history["removal"]
    _, removed = Ledger(copy).global_state(report["removal_round"])
    shutil.rmtree(copy)  # a copy of the whole history: hundreds of MB
    return (removed, repaired, report, client_work(history, "removal_requests"),
            client_work(history))


def task_arithmetic_negation(state, ledger: Ledger, client: str):
    record = ledger.client(client)
    return {**state, **{k: state[k] - record.alpha * record.delta[k] for k in record.fisher}}


class Judge:
    """Scores models of one seed against retraining's distribution: the ``references``
    (retrains without the client, with other local seeds)."""

    def __init__(self, cfg: dict, references: Sequence[dict[str, torch.Tensor]]):
        self.cfg = cfg
        inputs, labels, split, _ = experiment_for(cfg)
        self.model = fresh_model(cfg, inputs)
        self.x_test, self.y_test = inputs[split.test], labels[split.test]
        client = int(cfg["forget-client"])
        self.x_clean, self.y_clean = client_partition(cfg, client)
        self.x_own, self.y_own = poisoned(cfg, client, self.x_clean, self.y_clean)
        self.x_held, self.y_held = held_out_like(self.x_test, self.y_test, self.y_own,
                                                 int(cfg["seed"]))
        self.references = list(references)
        self.reference_probs = [self.probabilities(r, self.x_test) for r in self.references]
        accuracy = [self.accuracy(p) for p in self.reference_probs]
        predictions = [p.argmax(1) for p in self.reference_probs]
        mutual = [float((a == b).double().mean()) for i, a in enumerate(predictions)
                  for b in predictions[i + 1:]]
        #: the retrains' accuracy range, attack max and mean pairwise agreement
        self.spread = {"accuracy": [min(accuracy), max(accuracy)],
                       "attack_max": max(self.attack_success(r) for r in self.references),
                       "mutual_agreement": statistics.fmean(mutual) if mutual else 1.0}

    def probabilities(self, state, inputs) -> torch.Tensor:
        self.model.load_state_dict(state)
        self.model.eval()
        with torch.no_grad():
            return torch.softmax(self.model(inputs).double(), dim=1)

    def accuracy(self, probs: torch.Tensor) -> float:
        return float((probs.argmax(1) == self.y_test).double().mean())

    def attack_success(self, state) -> float:
        scenario = self.cfg["scenario"]
        if scenario in TRIGGERS:
            self.model.load_state_dict(state)
            return backdoor_success(self.model, self.x_test, self.y_test, trigger=scenario,
                                    target=int(self.cfg["backdoor-target"]))
        if scenario == "label-flip":
            source, target = flip_classes(self.cfg, self.y_clean)
            chosen = self.y_test == source
            predicted = self.probabilities(state, self.x_test[chosen]).argmax(1)
            return float((predicted == target).double().mean()) if chosen.any() else 0.0
        return 0.0

    def indistinguishable(self, scores: dict[str, float]) -> bool:
        """The module docstring's test against the references' spread."""
        low, high = self.spread["accuracy"]
        return (low - ACCURACY_SLACK <= scores["test_accuracy"] <= high + ACCURACY_SLACK
                and scores["attack_success"] <= self.spread["attack_max"] + ATTACK_SLACK
                and scores["agreement"] >= self.spread["mutual_agreement"] - AGREEMENT_SLACK)

    def __call__(self, state) -> dict[str, float]:
        probs = self.probabilities(state, self.x_test)
        own = self.probabilities(state, self.x_own)
        own_loss = F.nll_loss(own.clamp_min(1e-12).log(), self.y_own, reduction="none")
        held = self.probabilities(state, self.x_held)
        held_loss = F.nll_loss(held.clamp_min(1e-12).log(), self.y_held, reduction="none")
        params = [k for k, _ in self.model.named_parameters()]
        agreement, kl, distance = [], [], []
        for reference, reference_probs in zip(self.references, self.reference_probs,
                                              strict=True):
            agreement.append(float((probs.argmax(1) == reference_probs.argmax(1))
                                   .double().mean()))
            kl.append(float((reference_probs * (reference_probs.clamp_min(1e-12).log()
                                                - probs.clamp_min(1e-12).log())).sum(1).mean()))
            distance.append(float(torch.sqrt(sum(((state[k] - reference[k]).double() ** 2)
                                                 .sum() for k in params))))
        scores = {
            "test_accuracy": self.accuracy(probs),
            "attack_success": self.attack_success(state),
            "agreement": statistics.fmean(agreement),
            "kl_to_retrain": statistics.fmean(kl),
            "removed_accuracy": float((own.argmax(1) == self.y_own).double().mean()),
            "removed_loss": float(own_loss.mean()),
            "mia_advantage": loss_threshold_advantage(own_loss, held_loss),
            "dist_to_retrain": statistics.fmean(distance),
        }
        return {**scores, "indistinguishable": float(self.indistinguishable(scores))}


def held_out_like(x_test, y_test, labels, seed: int):
    """Test examples with the label histogram of ``labels`` (drawn with replacement where a
    class has too few): the non-members of the membership-inference test."""
    generator = torch.Generator().manual_seed(seed)
    index = []
    for label, count in zip(*torch.unique(labels, return_counts=True), strict=True):
        pool = torch.nonzero(y_test == label).flatten()
        if len(pool) == 0:
            continue
        pick = torch.randint(len(pool), (int(count),), generator=generator)
        index.append(pool[pick])
    index = torch.cat(index)
    return x_test[index], y_test[index]


def loss_threshold_advantage(member_loss: torch.Tensor, held_loss: torch.Tensor) -> float:
    """max over thresholds of TPR − FPR for "member if the loss is below the threshold"."""
    losses = torch.cat([member_loss, held_loss])
    is_member = torch.cat([torch.ones_like(member_loss), torch.zeros_like(held_loss)])
    order = torch.argsort(losses)
    tpr = torch.cumsum(is_member[order], 0) / len(member_loss)
    fpr = torch.cumsum(1 - is_member[order], 0) / len(held_loss)
    return float((tpr - fpr).max().clamp_min(0))


def run_seed(cfg: dict, seed: int, out: Path, methods: Sequence[str]
             ) -> tuple[dict[str, dict], dict]:
    """(each method's scores, the reference retrains' spread) for one seed."""
    client = str(cfg["forget-client"])
    work = out / f"seed{seed}"
    ledger_dir = work / "ledger"
    shutil.rmtree(ledger_dir, ignore_errors=True)
    epochs = float(cfg["local-epochs"])
    states, seconds, trainings, client_epochs = {}, {}, {}, {}

    states["none"], _ = simulate_to(cfg, f"FedUGM with client {client} ({cfg['scenario']})", **{
        "ledger": str(ledger_dir), "out": str(work / "train"),
        "save-final": str(work / "full.safetensors")})  # fmt: skip
    seconds["none"] = trainings["none"] = 0
    references = []
    for k in range(int(cfg["retrains"]) + 1):  # 0: the training's local seeds, the row
        name = "retrain" if k == 0 else f"retrain-{k}"
        state, history = retrain(cfg, f"retraining without it ({name})", **{
            "exclude-clients": client, "local-seed": -1 if k == 0 else seed + 1000 * k,
            "out": str(work / name), "save-final": str(work / f"{name}.safetensors")})
        if k == 0:
            states["retrain"], seconds["retrain"] = state, history["seconds"][-1]
            trainings["retrain"] = client_work(history)
        else:
            references.append(state)
    budget = int(float(cfg["correction-budget"]) * trainings["retrain"])
    per_round = trainings["retrain"] / max(int(cfg["num-server-rounds"]), 1)

    for (method, mode), (name, repaired_name) in REMOVAL_RUNS.items():
        if name not in methods and repaired_name not in methods:
            continue
        repair_rounds = max(1, int(budget // per_round)) if name == "replay" else 1
        removed, repaired, report, removal, repair = removal_run(
            cfg, ledger_dir, method, mode, work, repair_rounds=repair_rounds)
        states[name], states[repaired_name] = removed, repaired
        seconds[name], seconds[repaired_name] = report["removal_seconds"], report["seconds"]
        trainings[name], trainings[repaired_name] = removal, removal + repair
    for name, (policy, calibrate) in CORRECTED.items():
        if name in methods:
            states[name], _, report, trainings[name], _ = removal_run(
                cfg, ledger_dir, "replay", "online", work, repair_rounds=0, name=name,
                **{"removal-budget": budget, "removal-policy": policy,
                   "removal-calibrate": calibrate})
            seconds[name] = report["removal_seconds"]

    # FedEraser at the budget: calibrate as many evenly spaced rounds as it pays for
    rounds = int(cfg["num-server-rounds"])
    matched_interval = math.ceil(rounds / max(1, int(budget // per_round)))
    for name, interval, calibration_epochs in (
            ("federaser", int(cfg["federaser-interval"]), float(cfg["federaser-epochs"])),
            ("federaser-matched", matched_interval, epochs)):
        if name not in methods:
            continue
        copy = ledger_copy(ledger_dir, name, work)
        overrides = {"ledger": str(copy), "remove-client": client, "strategy": "federaser",
                     "federaser-interval": interval, "federaser-epochs": calibration_epochs,
                     "out": str(work / name), "save-final": str(work / f"{name}.safetensors")}
        states[name], history = simulate_to(
            cfg, name, federaser_server_app({**cfg, **overrides}), **overrides)
        seconds[name] = history["seconds"][-1]
        shutil.rmtree(copy)
        trainings[name] = client_work(history)
        client_epochs[name] = trainings[name] * calibration_epochs

    ledger = Ledger(ledger_dir)
    for name, remove in (
        ("ta-negation", lambda: task_arithmetic_negation(states["none"], ledger, client)),
        ("eq13-offline", lambda: remove_from_ledger(ledger, client, method="eq13",
                                                    revert_uninformed=False)[0]),
        ("replay-derived", lambda: remove_from_ledger(ledger, client, recentring=1.0,
                                                      shared_rank=0)[0]),
        ("subtract-applied", lambda: subtract_applied(ledger, client)[0]),
    ):
        if name in methods:
            start = time.perf_counter()
            states[name] = remove()
            seconds[name], trainings[name] = time.perf_counter() - start, 0
    ledger_bytes = ledger.disk_usage()
    if not cfg.get("keep-ledgers", False):
        shutil.rmtree(ledger_dir)
    progress(f"[seed {seed}] the training's ledger held {ledger_bytes / 1e6:.0f} MB "
             f"({ledger.history_bytes() / 1e6:.0f} MB of history)")
    judge = Judge(cfg, references)
    return {name: {**judge(states[name]), "seconds": seconds[name],
                   "client_trainings": trainings[name],
                   "client_epochs": client_epochs.get(name, trainings[name] * epochs)}
            for name in methods}, judge.spread


def format_table(results: dict[str, dict[str, list[float]]], scenario: str,
                 references: Sequence[dict], seeds: Sequence[int]) -> str:
    """The means table, then per seed each method's accuracy / attack success / agreement
    (%) and whether it is indistinguishable from the references (✓), under their spread."""
    lines = [f"scenario: {scenario}", "",
             "| method | indistinguishable (seeds) | test acc (%) | attack success (%) | "
             "agreement (%) | KL to retrain | removed client: acc (%) | loss | MIA adv. (%) | "
             "L2 to retrain | seconds | client trainings |", "|---" * 12 + "|"]
    for name, m in results.items():
        lines.append(
            f"| {name} | {sum(m['indistinguishable']):.0f}/{len(m['indistinguishable'])} | "
            f"{mean_std(m['test_accuracy'], 100)} | "
            f"{mean_std(m['attack_success'], 100)} | {mean_std(m['agreement'], 100)} | "
            f"{mean_std(m['kl_to_retrain'], 1, 3)} | {mean_std(m['removed_accuracy'], 100)} | "
            f"{mean_std(m['removed_loss'], 1, 3)} | {mean_std(m['mia_advantage'], 100)} | "
            f"{mean_std(m['dist_to_retrain'], 1)} | {mean_std(m['seconds'], 1)} | "
            f"{statistics.fmean(m['client_trainings']):.0f} |")
    lines += ["", "per seed: accuracy / attack success / agreement (%), ✓ = indistinguishable",
              "", "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---" * (len(seeds) + 1) + "|",
              "| *retrains (references)* | " + " | ".join(
                  f"{100 * r['accuracy'][0]:.1f}–{100 * r['accuracy'][1]:.1f} / "
                  f"≤ {100 * r['attack_max']:.1f} / {100 * r['mutual_agreement']:.1f}"
                  for r in references) + " |"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * a:.1f} / {100 * t:.1f} / {100 * g:.1f} {'✓' if ok else '✗'}"
            for a, t, g, ok in zip(m["test_accuracy"], m["attack_success"], m["agreement"],
                                   m["indistinguishable"], strict=True)) + " |")
    return "\n".join(lines)


def plot(results, path: Path, scenario: str) -> None:
    panels = (("test_accuracy", "test accuracy (%)", 100), ("attack_success",
              "attack success (%)", 100), ("agreement", "agreement with retraining (%)", 100),
              ("mia_advantage", "membership-inference advantage (%)", 100))
    fig, axes = runner.figure(len(panels), (16, 4))
    names = list(results)
    for ax, (metric, label, scale) in zip(axes, panels, strict=True):
        means = [scale * statistics.fmean(results[m][metric]) for m in names]
        spread = [scale * (statistics.stdev(results[m][metric])
                           if len(results[m][metric]) > 1 else 0.0) for m in names]
        ax.bar(range(len(names)), means, yerr=spread, capsize=2)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{label}\nmean ± std over seeds", fontsize=9)
    fig.suptitle(f"unlearning, scenario {scenario}", fontsize=10)
    runner.save_figure(fig, path)


def run_scenario(cfg: dict, scenario: str, out: Path) -> dict:
    methods = [m for m in METHODS if m in cfg["methods"]]
    unknown = sorted(set(cfg["methods"]) - set(METHODS))
    if unknown or "retrain" not in methods:
        raise SystemExit(f"unlearn: methods={cfg['methods']}; choose from {METHODS}, with "
                         "retrain (the reference).")
    if scenario not in SCENARIOS:
        raise SystemExit(f"unlearn: scenario={scenario!r}; choose one of {SCENARIOS} or all.")
    out.mkdir(parents=True, exist_ok=True)
    configs = [scenario_config(cfg, scenario, int(seed)) for seed in cfg["seeds"]]
    if int(cfg["retrains"]) < 2:
        raise SystemExit(f"unlearn: retrains={cfg['retrains']}; retraining's spread needs at "
                         "least 2 reference retrains (3 by default).")
    per_seed, references = zip(*(run_seed(config, config["seed"], out, methods)
                                 for config in configs), strict=True)
    results = {name: {metric: [r[name][metric] for r in per_seed] for metric in METRICS}
               for name in methods}
    summary = {"default": DEFAULT_METHOD, "scenario": scenario, "methods": results,
               "references": list(references),
               "forget_clients": [c["forget-client"] for c in configs], "config": cfg}
    runner.write_json(out / "unlearn.json", summary)
    plot(results, out / "unlearn.png", scenario)
    table = format_table(results, scenario, references, [c["seed"] for c in configs])
    (out / "unlearn.md").write_text(table + "\n")
    print(table + "\n", flush=True)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    layers = runner.simulation_layers(runner.CONFIGS / "compare.yaml", UNLEARN_CONFIG)
    cfg = runner.load_config(sys.argv[1:] if argv is None else argv, layers, prog="unlearn",
                             doc=__doc__)
    runner.quiet_flower_console()
    out = Path(str(cfg.out))
    plain_cfg = plain(cfg, "strategies")
    if cfg.scenario == "all":
        for scenario in SCENARIOS:
            run_scenario(plain_cfg, scenario, out / scenario)
    else:
        run_scenario(plain_cfg, str(cfg.scenario), out)
    progress(f"results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
