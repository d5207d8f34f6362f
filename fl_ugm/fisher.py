"""Diagonal Fisher estimators for any ``torch.nn.Module``.

F = Σ_i (∇_θ ℓ_i(θ))², a SUM over examples of squared per-example gradients of the
per-example negative log-likelihood ℓ_i, returned as float32 tensors keyed like
``model.named_parameters()`` (docs/design.md §1).

* ``kind="sampled"`` draws each example's target from the model's own predictive
  distribution: the true Fisher, what the paper's code uses (default).
* ``kind="empirical"`` uses the true targets.
* :class:`TrainingFisher` is the cheap estimator accumulated during local training.

Per-example gradients: ``nn.Linear`` and ``nn.Conv2d`` use closed forms from each layer's
inputs and output gradients (for a Linear layer, Σ_i (g_i x_iᵀ)² = (G∘G)ᵀ(X∘X)), as BackPACK
and Opacus do; every other parameter falls back to ``torch.func.vmap(grad(...))``. The model
is evaluated in ``eval()`` mode (BatchNorm uses its running statistics, dropout is off) so
that examples are independent; its training mode is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

FisherKind = Literal["sampled", "empirical"]
FISHER_KINDS: tuple[str, ...] = ("sampled", "empirical")


class Likelihood(Protocol):
    """How model outputs become a per-example NLL, and how targets are drawn from them."""

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example negative log-likelihood, shape ``(batch,)`` (constants may be dropped)."""
        ...

    def sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        """Targets drawn from the predictive distribution the outputs define."""
        ...


class CategoricalLikelihood:
    """Outputs are logits ``(batch, classes)``; targets are class indices."""

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        probs = torch.softmax(outputs.detach().float(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GaussianLikelihood:
    """Regression: y ~ N(output, variance·I); NLL = ½‖y − output‖² / variance (+ const)."""

    def __init__(self, variance: float = 1.0) -> None:
        if not (math.isfinite(variance) and variance > 0):
            raise ValueError(f"GaussianLikelihood: variance must be > 0, got {variance}.")
        self.variance = variance

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        squared = (outputs - targets.to(outputs.dtype)) ** 2
        return 0.5 * squared.reshape(squared.shape[0], -1).sum(dim=1) / self.variance

    def sample(self, outputs: Tensor, generator: torch.Generator | None) -> Tensor:
        noise = torch.randn(
            outputs.shape, generator=generator, dtype=outputs.dtype, device=outputs.device
        )
        return outputs.detach() + math.sqrt(self.variance) * noise


LIKELIHOODS = {"categorical": CategoricalLikelihood, "gaussian": GaussianLikelihood}


def diagonal_fisher(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    kind: FisherKind = "sampled",
    likelihood: str | Likelihood = "categorical",
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> dict[str, Tensor]:
    """Diagonal Fisher Σ_i (∇ℓ_i)² over every example in ``batches``.

    Parameters
    ----------
    model : nn.Module
        Evaluated at its current parameters, in eval mode (restored afterwards).
    batches : Iterable[tuple[Tensor, Tensor]]
        ``(inputs, targets)`` pairs; the first dimension indexes examples. With
        ``kind="sampled"`` the targets are only used for their count (they may be None).
    kind : {"sampled", "empirical"}
        Targets drawn from the model (true Fisher) or the given targets (empirical Fisher).
    likelihood : {"categorical", "gaussian"} or Likelihood
        Per-example NLL and sampler; pass an object with ``nll`` and ``sample`` for a custom
        loss (e.g. ``GaussianLikelihood(variance=0.5)``).
    generator : torch.Generator, optional
        Randomness for ``kind="sampled"`` (seed it for reproducible Fishers).
    chunk_size : int
        Examples per vectorised chunk for per-example gradients (bounds memory).

    Returns
    -------
    dict[str, Tensor]
        One float32 tensor per ``model.named_parameters()`` entry (same keys, order, shapes,
        device), the sum over all examples.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"diagonal_fisher: kind={kind!r}; choose one of {FISHER_KINDS}.")
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"diagonal_fisher: likelihood={likelihood!r}; choose one of "
                f"{tuple(LIKELIHOODS)} or pass an object with nll() and sample()."
            )
        likelihood = LIKELIHOODS[likelihood]()
    if chunk_size < 1:
        raise ValueError(f"diagonal_fisher: chunk_size must be ≥ 1, got {chunk_size}.")

    params = dict(model.named_parameters())
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    estimator = _PerExampleSquares(model, likelihood, chunk_size)
    was_training = model.training
    frozen = [p for p in params.values() if not p.requires_grad]
    model.eval()
    for p in frozen:  # gradients are needed for every parameter, frozen or not
        p.requires_grad_(True)
    examples = 0
    try:
        for batch_index, (inputs, targets) in enumerate(batches):
            inputs = inputs.to(_device_of(model))
            if kind == "empirical":
                if targets is None:
                    raise ValueError("diagonal_fisher: kind='empirical' needs targets.")
                targets = targets.to(inputs.device)
            if inputs.shape[0] == 0:
                continue
            estimator.accumulate(inputs, targets, kind, generator, fisher)
            examples += inputs.shape[0]
            for name, values in fisher.items():
                if not bool(torch.isfinite(values).all()):
                    raise ValueError(
                        f"diagonal_fisher: the Fisher of '{name}' became NaN/Inf at batch "
                        f"{batch_index}; the model's outputs or gradients are not finite."
                    )
    finally:
        estimator.close()
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    if examples == 0:
        raise ValueError("diagonal_fisher: the batches held no examples.")
    return fisher


class TrainingFisher:
    """Cheap diagonal Fisher accumulated during local training, from mini-batch gradients.

    Call :meth:`update` after every ``loss.backward()`` where ``loss`` is the MEAN over a
    batch of B examples (before adding any regulariser's gradient, e.g. a proximal term).
    The batch's sum of squared per-example gradients is estimated by (B·ḡ)², where ḡ is the
    mean gradient; :meth:`estimate` rescales the average over all steps to ``num_examples``:

        F ≈ num_examples · Σ_steps (B_s ḡ_s)² / Σ_steps B_s        (float32, a sum)

    Bias (documented, not corrected): (B·ḡ)² = Σ_i g_i² + Σ_{i≠j} g_i·g_j, so it is exact for
    B = 1 and otherwise adds B(B−1)·(mean gradient)², overestimating where the full-batch
    gradient is far from zero (early in training); it is an empirical Fisher (true labels)
    taken along the training trajectory, not at the final weights. Cost: one fused
    multiply-add per parameter per step.
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {n: p for n, p in model.named_parameters()}
        self._sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()}
        self._examples_seen = 0

    def update(self, batch_size: int) -> None:
        """Fold in the current ``.grad`` of every parameter (gradient of a mean loss)."""
        if batch_size < 1:
            raise ValueError(f"TrainingFisher.update: batch_size must be ≥ 1, got {batch_size}.")
        for name, param in self._params.items():
            if param.grad is not None:
                scaled = param.grad.detach().float()
                self._sums[name].addcmul_(scaled, scaled, value=float(batch_size) ** 2)
        self._examples_seen += batch_size

    def estimate(self, num_examples: int) -> dict[str, Tensor]:
        """The Fisher summed over ``num_examples`` examples (the client's dataset size)."""
        if self._examples_seen == 0:
            raise ValueError("TrainingFisher.estimate: update() was never called.")
        scale = num_examples / self._examples_seen
        return {name: total * scale for name, total in self._sums.items()}


# --------------------------------------------------------------------------- internals


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def _closed_form_supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


class _PerExampleSquares:
    """Adds Σ_i (∇ℓ_i)² for one batch into a Fisher dict (closed forms + torch.func fallback)."""

    def __init__(self, model: nn.Module, likelihood: Likelihood, chunk_size: int) -> None:
        self.model = model
        self.likelihood = likelihood
        self.chunk_size = chunk_size
        name_of = {id(p): n for n, p in model.named_parameters()}
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        # closed form: module name -> (module, weight key, bias key or None)
        self.fast: dict[str, tuple[nn.Module, str, str | None]] = {}
        for module_name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            if own and _closed_form_supported(module) and all(owners[id(p)] == 1 for p in own):
                bias = name_of[id(module.bias)] if module.bias is not None else None
                self.fast[module_name] = (module, name_of[id(module.weight)], bias)
        fast_keys = {k for _, w, b in self.fast.values() for k in (w, b) if k is not None}
        self.fallback_keys = [n for n in name_of.values() if n not in fast_keys]
        self._captured: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._hooks = [
            module.register_forward_hook(self._capture(name))
            for name, (module, _, _) in self.fast.items()
        ]

    def _capture(self, name: str):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self._captured.setdefault(name, []).append((inputs[0].detach(), output))

        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()

    def accumulate(
        self,
        inputs: Tensor,
        targets: Tensor | None,
        kind: str,
        generator: torch.Generator | None,
        fisher: dict[str, Tensor],
    ) -> None:
        self._captured = {}
        with torch.enable_grad():
            outputs = self.model(inputs)
            if kind == "sampled":
                targets = self.likelihood.sample(outputs.detach(), generator)
            captured = self._captured
            self._captured = {}
            # a layer called twice per forward (weight sharing) has no per-call closed form
            for name in [n for n, calls in captured.items() if len(calls) != 1]:
                if name in self.fast:
                    _, weight_key, bias_key = self.fast.pop(name)
                    self.fallback_keys += [k for k in (weight_key, bias_key) if k is not None]
            names = [n for n in captured if n in self.fast]
            if names:
                total = self.likelihood.nll(outputs, targets).sum()
                output_grads = torch.autograd.grad(
                    total, [captured[n][0][1] for n in names], allow_unused=True
                )
                for name, out_grad in zip(names, output_grads, strict=True):
                    if out_grad is None:  # layer does not influence the output
                        continue
                    module, weight_key, bias_key = self.fast[name]
                    layer_input = captured[name][0][0]
                    self._add_closed_form(module, layer_input, out_grad, fisher, weight_key,
                                          bias_key)
        if self.fallback_keys:
            self._add_fallback(inputs, targets.detach(), fisher)

    def _add_closed_form(self, module, x, g, fisher, weight_key, bias_key) -> None:
        x = x.float()
        g = g.float()
        if isinstance(module, nn.Linear):
            if x.dim() == 2:  # Σ_i (g_i x_iᵀ)² = (G∘G)ᵀ (X∘X)
                fisher[weight_key] += (g * g).T @ (x * x)
                if bias_key is not None:
                    fisher[bias_key] += (g * g).sum(0)
                return
            # extra (sequence) dims: the per-example gradient sums over them first
            x = x.reshape(x.shape[0], -1, x.shape[-1])
            g = g.reshape(g.shape[0], -1, g.shape[-1])
            for start in range(0, x.shape[0], self.chunk_size):
                xs, gs = x[start : start + self.chunk_size], g[start : start + self.chunk_size]
                per_example = torch.bmm(gs.transpose(1, 2), xs)  # (b, out, in)
                fisher[weight_key] += (per_example**2).sum(0)
                if bias_key is not None:
                    fisher[bias_key] += (gs.sum(1) ** 2).sum(0)
            return
        # Conv2d via unfold: per-example grad_w = G_i U_iᵀ with U_i the im2col patches
        weight = fisher[weight_key]
        g = g.reshape(g.shape[0], g.shape[1], -1)  # (B, out, L)
        for start in range(0, x.shape[0], self.chunk_size):
            patches = F.unfold(
                x[start : start + self.chunk_size],
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )  # (b, in*kh*kw, L)
            gs = g[start : start + self.chunk_size]
            per_example = torch.bmm(gs, patches.transpose(1, 2))  # (b, out, in*kh*kw)
            weight += (per_example**2).sum(0).reshape(weight.shape)
            if bias_key is not None:
                fisher[bias_key] += (gs.sum(2) ** 2).sum(0)

    def _add_fallback(self, inputs: Tensor, targets: Tensor, fisher: dict[str, Tensor]) -> None:
        """Per-example gradients of the remaining parameters with torch.func.vmap(grad)."""
        model = self.model
        wanted = {k: p.detach() for k, p in model.named_parameters() if k in self.fallback_keys}
        fixed = {k: p.detach() for k, p in model.named_parameters() if k not in wanted}
        fixed.update(dict(model.named_buffers()))
        likelihood = self.likelihood

        def example_loss(trainable: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(model, {**fixed, **trainable}, (x.unsqueeze(0),))
            return likelihood.nll(out, y.unsqueeze(0)).sum()

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=self.chunk_size)
        for key, values in per_example(wanted, inputs, targets).items():
            fisher[key] += (values.float() ** 2).sum(0)


def iterate_batches(
    inputs: Tensor, targets: Tensor, batch_size: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive ``(inputs, targets)`` slices of ``batch_size`` examples (the last shorter)."""
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]
