"""What FedUGM does with a round's parsed replies before the round engine merges them:
admit (which clients may take part), then the defences (``fl_ugm.robust``: the Fisher clip,
the update screen), each decision logged with node and client id. The replies are
``fl_ugm.protocol.ParsedReply``; a reply left out is listed as a ``DroppedReply`` or,
screened out, only logged (it took no part in the round)."""

from __future__ import annotations

import dataclasses
import math
from logging import INFO, WARNING

from flwr.common.logger import log

from fl_ugm.engine import RunSettings
from fl_ugm.protocol import DroppedReply, ParsedReply
from fl_ugm.robust import clip_fisher_inflation, clip_num_examples
from fl_ugm.roster import ClientRoster

#: Fisher clips up to this many times the median are logged at INFO as honest variation
#: (docs/design.md §1, "Defences"); above it a client is likely inflating its Fisher (a
#: WARNING).
CLIP_WARNING_RATIO = 100.0
#: The round's aggregated train metrics carry how many clients' claimed sizes and how many
#: client tensors the clips scaled down,
NUM_EXAMPLES_CLIPPED_METRIC = "num-examples-clipped"
FISHER_CLIPPED_METRIC = "fisher-clipped-tensors"
#: ... how many replies the update screen left out, and how many it scaled down.
SCREENED_OUT_METRIC = "screened-out-clients"
NORM_BOUNDED_METRIC = "norm-bounded-clients"
#: Screened-out clients with a cosine below this are logged as warnings, the others at INFO
#: (where honest non-IID clients reach: docs/design.md §1).
SCREEN_WARNING_COSINE = -0.5


def admit(replies: list[ParsedReply], dropped: list[DroppedReply], roster: ClientRoster
          ) -> list[ParsedReply]:
    """The replies that may take part (one without a client id does). Dropped: an excluded
    client's; a claim to an id bound to another, connected node (``ClientRoster.claim``);
    and every claim to an id that more than one node sends this round, but the bound
    node's."""
    nodes: dict[str, set[int]] = {}
    for reply in replies:
        if reply.client_id is not None:
            nodes.setdefault(reply.client_id, set()).add(reply.node_id)
    admitted, seen = [], set()
    for reply in replies:
        client = reply.client_id
        if client is None:
            admitted.append(reply)
            continue
        if len(nodes[client]) > 1 and roster.node_of.get(client) not in nodes[client]:
            reason = (f"nodes {sorted(nodes[client])} all replied as client {client!r} this "
                      "round and none of them is bound to it; every claim is dropped.")
        elif len(nodes[client]) > 1 and roster.node_of.get(client) != reply.node_id:
            reason = (f"client id {client!r} is bound to node {roster.node_of[client]}, which "
                      "replied too.")
        elif client in seen:
            reason = f"a second reply as client {client!r} this round."
        elif (reason := roster.claim(client, reply.node_id)) is None:
            seen.add(client)
            if client not in roster.excluded:
                admitted.append(reply)
                continue
            reason = f"client {client!r} was removed or excluded from this run; its reply is " \
                     "ignored."
        dropped.append(DroppedReply(reply.node_id, client, reason))
    return admitted


def clip_sizes(settings: RunSettings, server_round: int, replies: list[ParsedReply]
               ) -> int | None:
    """The weight defence on the claimed sizes (``fisher_clip``, ``client_sizes``), in place:
    a bounded client is weighted as a client of the bounded size (its n, and its Fisher, a
    sum over its examples, scaled alike); logs every bounded claim and returns how many were
    bounded (None when off)."""
    known = settings.client_sizes or {}
    if settings.fisher_clip is None and not known:
        return None
    sizes, bounded = clip_num_examples(
        [r.contribution.num_examples for r in replies], settings.fisher_clip or math.inf,
        [known.get(r.client_id) for r in replies])
    for reply, size in zip(replies, sizes, strict=True):
        claimed = reply.contribution.num_examples
        if size < claimed:  # weighted as a client of ``size`` examples: F (a sum) scales too
            reply.contribution = dataclasses.replace(
                reply.contribution, num_examples=size,
                fisher={k: v * (size / claimed) for k, v in reply.contribution.fisher.items()})
    for index, ratio in bounded:
        reply = replies[index]
        log(WARNING if ratio > CLIP_WARNING_RATIO else INFO,
            "aggregate_train: node %d%s in round %d claims %.3g× the median client's number "
            "of examples; weighted as %g examples.", reply.node_id, who(reply.client_id),
            server_round, ratio, reply.contribution.num_examples)
    return len(bounded)


def clip_fishers(settings: RunSettings, server_round: int, replies: list[ParsedReply]
                 ) -> int | None:
    """The Fisher-inflation defence (``fisher_clip``), in place: logs every clipped tensor and
    returns how many were clipped (None when the defence is off or the rule ignores F)."""
    if settings.fisher_clip is None or not settings.rule.uses_fisher:
        return None
    fishers, clipped = clip_fisher_inflation(
        [r.contribution.fisher for r in replies],
        [r.contribution.num_examples for r in replies], settings.fisher_clip)
    for reply, fisher in zip(replies, fishers, strict=True):
        reply.contribution = dataclasses.replace(reply.contribution, fisher=fisher)
    for index, key, ratio in clipped:
        reply = replies[index]
        log(WARNING if ratio > CLIP_WARNING_RATIO else INFO,
            "aggregate_train: node %d%s in round %d reports a Fisher on '%s' %.3g× the median "
            "client's (per example); scaled down to %g×.", reply.node_id, who(reply.client_id),
            server_round, key, ratio, settings.fisher_clip)
    return len(clipped)


def screen(settings: RunSettings, server_round: int, replies: list[ParsedReply], needed: int
           ) -> tuple[int, int] | None:
    """The update screen (``update_screen``), in place: scales long deltas down and removes
    the screened-out clients from ``replies``, logging each; returns (how many left out, how
    many scaled), or None when the screen is off or the round is short of replies anyway."""
    bound = settings.update_screen
    if bound is None or not replies or len(replies) < needed:
        return None
    deltas, verdicts = bound([r.contribution.delta for r in replies],
                             list(replies[0].contribution.fisher))
    kept = []
    for reply, delta, verdict in zip(replies, deltas, verdicts, strict=True):
        if verdict.scale < 1:
            reply.contribution = dataclasses.replace(reply.contribution, delta=delta)
            log(INFO, "aggregate_train: node %d%s in round %d sent a Δ %.3g× the median "
                "client's norm; scaled down to %g×.", reply.node_id, who(reply.client_id),
                server_round, verdict.norm_ratio, bound.norm_bound)
        if not verdict.dropped:
            kept.append(reply)
            continue
        log(WARNING if verdict.cosine < SCREEN_WARNING_COSINE else INFO,
            "aggregate_train: leaving out node %d%s in round %d: update screen: its Δ has "
            "cosine %.3f with the round's median Δ (≤ %g: it points away from what most "
            "clients ask for).", reply.node_id, who(reply.client_id), server_round,
            verdict.cosine, bound.min_cosine)
    replies[:] = kept
    return (sum(v.dropped for v in verdicts), sum(v.scale < 1 for v in verdicts))


def who(client_id: str | None) -> str:
    """" (client 'c1')" for a log line, or nothing."""
    return f" (client {client_id!r})" if client_id else ""
