"""Client memory: every client's latest reply, re-centred to the current global
(docs/design.md §1, "Client memory"). Pure torch; FedUGM's ``client_memory`` option uses it.

With partial participation a round's merge sees only the sampled clients, so on label-skewed
data the global swings towards whichever classes were sampled. The memory keeps, for every
client that ever replied, its latest reply (Δ_j, F_j, n_j) and the global s_j it fine-tuned
from. In a later round that client is not sampled in, it enters the merge with its reply
re-centred to the current global θ (:func:`recentred_delta`):

    Δ̃_j = Δ_j + F_j (s_j − θ) / (P + F_j)

P is the prior precision (δ, or δ plus the server Fisher, per entry). On a quadratic loss
with Hessian F_j the fine-tune from s_j stops where (P + F_j) θ_j = P s_j + F_j θ*_j, so Δ̃_j
is exactly the Δ client j would send if it fine-tuned from θ today: with the memory, a
round of partial participation on the linear-regression oracle merges as if every client
seen so far had taken part. With F ≡ 0 (the task-arithmetic merge) Δ̃_j = Δ_j and the memory
is MIFA's (Gu et al., 2021): the average of every client's latest update. Entries without a
Fisher (buffers) keep their remembered Δ.

Cost: the server holds two model-sized tensors per client seen (Δ_j and F_j, in the dtype
they arrived in) and one global per round a remembered reply started from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import Tensor

from fl_ugm.merge import prior_at


def recentred_delta(delta: Mapping[str, Tensor], fisher: Mapping[str, Tensor],
                    start: Mapping[str, Tensor], current: Mapping[str, Tensor],
                    prior: float | Mapping[str, Tensor | float]) -> dict[str, Tensor]:
    """Δ + F (s − θ) / (P + F) for the entries ``fisher`` names (``start`` s, ``current`` θ,
    ``prior`` P > 0: a float or per entry); the other entries of ``delta`` as they are."""
    out = dict(delta)
    for key, f in fisher.items():
        p = prior_at(prior, key)
        out[key] = delta[key] + f * (start[key] - current[key]).to(f.dtype) / (p + f)
    return out


@dataclass(frozen=True)
class RememberedReply:
    """A client's latest merged reply: Δ_j and F_j (a sum over its n_j examples), and the
    round it replied in (it fine-tuned from that round's start global)."""

    delta: dict[str, Tensor]
    fisher: dict[str, Tensor]
    num_examples: float
    reply_round: int


class ClientMemory:
    """Each client's latest reply, and the globals those replies started from (``starts``,
    by reply round)."""

    def __init__(self) -> None:
        self.replies: dict[str, RememberedReply] = {}
        self.starts: dict[int, dict[str, Tensor]] = {}

    def remember(self, server_round: int, start: Mapping[str, Tensor],
                 replies: Iterable[tuple[str, Mapping[str, Tensor], Mapping[str, Tensor],
                                         float]]) -> None:
        """Keep (client id, Δ, F, n) of each reply merged in ``server_round``, which
        fine-tuned from ``start``; a client's earlier reply is replaced."""
        for client, delta, fisher, num_examples in replies:
            self.replies[client] = RememberedReply(dict(delta), dict(fisher),
                                                   float(num_examples), server_round)
            self.starts.setdefault(server_round, dict(start))
        used = {r.reply_round for r in self.replies.values()}
        for old in [r for r in self.starts if r not in used]:
            del self.starts[old]

    def recentred(self, current: Mapping[str, Tensor],
                  prior: float | Mapping[str, Tensor | float] | None, skip: Iterable[str] = ()
                  ) -> list[tuple[str, dict[str, Tensor], dict[str, Tensor], float]]:
        """(client id, Δ̃, F, n) of every remembered client not in ``skip``, in client-id
        order, each Δ re-centred from its start global to ``current`` under the prior
        ``prior`` (None: a merge that ignores the Fisher, F ≡ 0, so Δ̃ = Δ)."""
        skip = set(skip)
        return [(client, r.delta if prior is None else recentred_delta(
                    r.delta, r.fisher, self.starts[r.reply_round], current, prior),
                 r.fisher, r.num_examples)
                for client, r in sorted(self.replies.items()) if client not in skip]
