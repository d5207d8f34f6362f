"""Diagonal Fisher estimators for any ``torch.nn.Module``.

F = Σ_i (∇_θ ℓ_i(θ))², a SUM over examples of squared per-example gradients of the
per-example negative log-likelihood ℓ_i, returned as float32 tensors keyed like
``model.named_parameters()`` (the trainable ones by default; docs/design.md §1), on the
model's device.

Any data pipeline: ``batches`` is any iterable (a ``DataLoader``) of ``(inputs, targets)``
tuples, or of anything ``unpack`` maps to that pair (e.g. flwr-datasets' dicts:
``unpack=lambda b: (b["img"], b["label"])``). ``inputs`` is a tensor, a tuple (the model is
called as ``model(*inputs)``) or a dict (``model(**inputs)``, e.g. a tokenizer's output);
a model output with ``.logits`` (a Hugging Face ``ModelOutput``) is read through it.
Likelihoods: ``"categorical"`` (classification), ``"gaussian"`` (regression) and
``"token-categorical"`` (sequence models: one categorical per position, padding masked).

* ``kind="sampled"`` draws each example's target from the model's own predictive
  distribution: the true Fisher, what the paper's code uses (default).
* ``kind="empirical"`` uses the true targets.
* ``kind="exact"`` (categorical likelihood) is the true Fisher without sampling noise: the
  expectation over each example's C classes, Σ_i Σ_c p_ic (∇ℓ(x_i, c))², computed exactly
  with C backward passes per batch (C times the sampled Fisher's cost; the sampled one is
  its unbiased one-draw estimate).
* :class:`TrainingFisher` is the cheap estimator accumulated during local training.

Per-example gradients: ``nn.Linear``, ``nn.Conv2d`` and ``nn.BatchNorm1d/2d/3d`` (an affine
map in eval mode) use closed forms from each layer's inputs and output gradients (for a
Linear layer, and a conv with one output position, Σ_i (g_i x_iᵀ)² = (G∘G)ᵀ(X∘X)), as BackPACK
and Opacus do; every other parameter falls back to ``torch.func.vmap(grad(...))``. The model
is evaluated in ``eval()`` mode (BatchNorm uses its running statistics, dropout is off) so
that examples are independent; its training mode is restored afterwards. On a GPU, PyTorch
lets cuDNN run convolutions in TF32 by default (``torch.backends.cudnn.allow_tf32``); turn it
off for float32-exact Fishers (BENCHMARKS.md has the measured difference).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_leaves, tree_map

FisherKind = Literal["sampled", "empirical", "exact"]
FISHER_KINDS: tuple[str, ...] = ("sampled", "empirical", "exact")


class Likelihood(Protocol):
    """How model outputs become a per-example NLL, and how targets are drawn from them."""

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example negative log-likelihood, shape ``(batch,)`` (constants may be dropped)."""
        ...

    def sample(self, outputs: Tensor, generator: torch.Generator | None,
               observed: Tensor | None = None) -> Tensor:
        """Targets drawn from the predictive distribution the outputs define. ``observed``
        is the batch's own targets (or None), e.g. for a mask; a likelihood whose ``sample``
        takes only (outputs, generator) is called without it."""
        ...


class CategoricalLikelihood:
    """Outputs are logits ``(batch, classes)``; targets are class indices."""

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def sample(self, outputs: Tensor, generator: torch.Generator | None,
               observed: Tensor | None = None) -> Tensor:
        return _draw_classes(outputs, generator)


class TokenCategoricalLikelihood:
    """Sequence models: outputs are logits ``(batch, positions, vocabulary)``; targets are
    token ids ``(batch, positions)``, ``ignore_index`` (Hugging Face's -100) where a position
    does not count (padding, the prompt). An example's NLL is the SUM over its counted
    positions. With ``kind="sampled"`` the targets are drawn per position and the batch's
    own targets only supply the mask: pass the labels, or e.g.
    ``torch.where(attention_mask.bool(), 0, -100)``; without targets every position counts.
    For a causal LM, shift the logits or the labels as your loss does."""

    def __init__(self, ignore_index: int = -100) -> None:
        self.ignore_index = ignore_index

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = F.cross_entropy(outputs.flatten(0, -2), targets.flatten(),
                                 ignore_index=self.ignore_index, reduction="none")
        return losses.reshape(targets.shape).flatten(1).sum(dim=1)

    def sample(self, outputs: Tensor, generator: torch.Generator | None,
               observed: Tensor | None = None) -> Tensor:
        drawn = _draw_classes(outputs.flatten(0, -2), generator).reshape(outputs.shape[:-1])
        if observed is None:
            return drawn
        return torch.where(observed.to(drawn.device) == self.ignore_index,
                           self.ignore_index, drawn)


class GaussianLikelihood:
    """Regression: y ~ N(output, variance·I); NLL = ½‖y − output‖² / variance (+ const)."""

    def __init__(self, variance: float = 1.0) -> None:
        if not (math.isfinite(variance) and variance > 0):
            raise ValueError(f"GaussianLikelihood: variance must be > 0, got {variance}.")
        self.variance = variance

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        squared = (outputs - targets.to(outputs.dtype)) ** 2
        return 0.5 * squared.reshape(squared.shape[0], -1).sum(dim=1) / self.variance

    def sample(self, outputs: Tensor, generator: torch.Generator | None,
               observed: Tensor | None = None) -> Tensor:
        device = generator.device if generator is not None else outputs.device
        noise = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype,
                            device=device).to(outputs.device)
        return outputs.detach() + math.sqrt(self.variance) * noise


def _draw_classes(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One class index per row of ``logits`` (2-D), drawn on the generator's device."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    if generator is not None:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


LIKELIHOODS = {"categorical": CategoricalLikelihood, "gaussian": GaussianLikelihood,
               "token-categorical": TokenCategoricalLikelihood}
#: Which parameters get a Fisher: the ones with ``requires_grad`` (what a client trains and
#: sends), or every one.
FISHER_PARAMETERS = ("trainable", "all")


def diagonal_fisher(model: nn.Module, batches: Iterable[Any], *, kind: FisherKind = "sampled",
                    likelihood: str | Likelihood = "categorical",
                    generator: torch.Generator | None = None, chunk_size: int = 64,
                    parameters: str = "trainable",
                    unpack: Callable[[Any], tuple[Any, Tensor | None]] | None = None,
                    ) -> dict[str, Tensor]:
    """Diagonal Fisher Σ_i (∇ℓ_i)² over every example in ``batches``.

    Parameters
    ----------
    model : nn.Module
        Evaluated at its current parameters, in eval mode (restored afterwards), on its own
        device (the batches are moved there).
    batches : Iterable
        ``(inputs, targets)`` pairs (a tensor alone means no targets), or whatever
        ``unpack`` maps to such a pair; the first dimension of every input tensor indexes
        examples. ``inputs``: a tensor, a tuple (``model(*inputs)``) or a dict
        (``model(**inputs)``). With ``kind="sampled"`` the targets are only used for their
        mask (token-categorical) and may be None.
    kind : {"sampled", "empirical", "exact"}
        Targets drawn from the model (true Fisher), the given targets (empirical Fisher), or
        every class weighted by its predicted probability (the true Fisher's exact
        expectation; categorical likelihood only).
    likelihood : {"categorical", "gaussian", "token-categorical"} or Likelihood
        Per-example NLL and sampler; pass an object with ``nll`` and ``sample`` for a custom
        loss (e.g. ``GaussianLikelihood(variance=0.5)``).
    generator : torch.Generator, optional
        Randomness for ``kind="sampled"`` (seed it for reproducible Fishers); targets are
        drawn on its device.
    chunk_size : int
        Examples per vectorised chunk for per-example gradients (bounds memory).
    parameters : {"trainable", "all"}
        The parameters with ``requires_grad`` (a frozen backbone gets none and costs no
        per-example gradients), or every parameter.
    unpack : callable, optional
        Maps one element of ``batches`` to ``(inputs, targets)``, e.g.
        ``lambda b: (b["img"], b["label"])`` for a DataLoader of dicts.

    Returns
    -------
    dict[str, Tensor]
        One float32 tensor per selected ``model.named_parameters()`` entry (same keys,
        order, shapes, device), the sum over all examples.
    """
    if kind not in FISHER_KINDS:
        raise ValueError(f"diagonal_fisher: kind={kind!r}; choose one of {FISHER_KINDS}.")
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"diagonal_fisher: likelihood={likelihood!r}; choose one of "
                             f"{tuple(LIKELIHOODS)} or pass an object with nll() and sample().")
        likelihood = LIKELIHOODS[likelihood]()
    if kind == "exact" and type(likelihood) is not CategoricalLikelihood:
        raise ValueError("diagonal_fisher: kind='exact' sums over the classes of a "
                         "categorical likelihood; use kind='sampled' for this likelihood.")
    if chunk_size < 1:
        raise ValueError(f"diagonal_fisher: chunk_size must be ≥ 1, got {chunk_size}.")
    if parameters not in FISHER_PARAMETERS:
        raise ValueError(f"diagonal_fisher: parameters={parameters!r}; choose one of "
                         f"{FISHER_PARAMETERS}.")

    params = {name: p for name, p in model.named_parameters()
              if parameters == "all" or p.requires_grad}
    if not params:
        raise ValueError("diagonal_fisher: the model has no trainable parameters (every "
                         "requires_grad is False); unfreeze some, or pass parameters='all'.")
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    estimator = _PerExampleSquares(model, set(params), likelihood, chunk_size)
    was_training = model.training
    frozen = [p for p in params.values() if not p.requires_grad]
    model.eval()
    for p in frozen:  # parameters="all": gradients are needed for the frozen ones too
        p.requires_grad_(True)
    device = _device_of(model)
    examples = 0
    try:
        for batch_index, batch in enumerate(batches):
            inputs, targets = unpack(batch) if unpack is not None else _default_unpack(batch)
            inputs = tree_map(lambda t: t.to(device) if isinstance(t, Tensor) else t, inputs)
            if kind == "empirical" and targets is None:
                raise ValueError("diagonal_fisher: kind='empirical' needs targets.")
            if targets is not None:
                targets = targets.to(device)
            size = _batch_size(inputs)
            if size == 0:
                continue
            estimator.accumulate(inputs, targets, kind, generator, fisher)
            examples += size
            for name, values in fisher.items():
                if not bool(torch.isfinite(values).all()):
                    raise ValueError(f"diagonal_fisher: the Fisher of '{name}' became NaN/Inf at "
                                     f"batch {batch_index}; the model's outputs or gradients "
                                     "are not finite.")
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
    multiply-add per parameter per step. Covers the trainable parameters (``requires_grad``).
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {n: p for n, p in model.named_parameters() if p.requires_grad}
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


def _default_unpack(batch: Any) -> tuple[Any, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, tuple | list) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(f"diagonal_fisher: a batch is a {type(batch).__name__}"
                    f"{' with keys ' + str(sorted(batch)) if isinstance(batch, Mapping) else ''}; "
                    "pass unpack=lambda batch: (inputs, targets), e.g. lambda b: (b['img'], "
                    "b['label']).")


def _batch_size(inputs: Any) -> int:
    leaves = [t for t in tree_leaves(inputs) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError("diagonal_fisher: the batch's inputs hold no tensor.")
    return leaves[0].shape[0]


def call_model(model: nn.Module, inputs: Any) -> Tensor:
    """``model(inputs)``, ``model(*inputs)`` for a tuple, ``model(**inputs)`` for a dict; an
    output with ``.logits`` (a Hugging Face ``ModelOutput``) gives its logits."""
    if isinstance(inputs, Mapping):
        outputs = model(**inputs)
    elif isinstance(inputs, tuple | list):
        outputs = model(*inputs)
    else:
        outputs = model(inputs)
    return _as_tensor(outputs)


def _as_tensor(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"the model returned a {type(outputs).__name__}; the Fisher needs a "
                    "tensor of outputs (or an object with .logits).")


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _closed_form_supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    if type(module) in _BATCH_NORMS:  # eval mode with running statistics: an affine map
        return module.affine and module.running_mean is not None
    return (type(module) is nn.Conv2d and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


class _PerExampleSquares:
    """Adds Σ_i (∇ℓ_i)² for one batch into a Fisher dict (closed forms + torch.func fallback)."""

    def __init__(self, model: nn.Module, wanted: set[str], likelihood: Likelihood,
                 chunk_size: int) -> None:
        self.model = model
        self.likelihood = likelihood
        self.sample_reads_targets = len(inspect.signature(likelihood.sample).parameters) >= 3
        self.chunk_size = chunk_size
        name_of = {id(p): n for n, p in model.named_parameters() if n in wanted}
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        # closed form: module name -> (module, weight key, bias key or None)
        self.fast: dict[str, tuple[nn.Module, str, str | None]] = {}
        for module_name, module in model.named_modules():
            own = list(module.parameters(recurse=False))
            if own and _closed_form_supported(module) and all(
                    owners[id(p)] == 1 and id(p) in name_of for p in own):
                bias = name_of[id(module.bias)] if module.bias is not None else None
                self.fast[module_name] = (module, name_of[id(module.weight)], bias)
        fast_keys = {k for _, w, b in self.fast.values() for k in (w, b) if k is not None}
        self.fallback_keys = [n for n in name_of.values() if n not in fast_keys]
        self._captured: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self._hooks = [module.register_forward_hook(self._capture(name))
                       for name, (module, _, _) in self.fast.items()]

    def _capture(self, name: str):
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            self._captured.setdefault(name, []).append((inputs[0].detach(), output))

        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()

    def accumulate(self, inputs: Tensor, targets: Tensor | None, kind: str,
                   generator: torch.Generator | None, fisher: dict[str, Tensor]) -> None:
        self._captured = {}
        with torch.enable_grad():
            outputs = call_model(self.model, inputs)
            if kind == "exact":  # every class c, each example's loss weighted by √p_ic
                if outputs.dim() != 2:
                    raise ValueError("diagonal_fisher: kind='exact' needs [batch, classes] "
                                     f"logits; got shape {tuple(outputs.shape)}.")
                root_probs = torch.softmax(outputs.detach().float(), dim=-1).sqrt()
                draws = [(torch.full_like(root_probs[:, 0], c, dtype=torch.long),
                          root_probs[:, c]) for c in range(outputs.shape[1])]
            else:
                if kind == "sampled":
                    observed = (targets,) if self.sample_reads_targets else ()
                    targets = self.likelihood.sample(outputs.detach(), generator, *observed)
                draws = [(targets, None)]
            captured = self._captured
            self._captured = {}
            # a layer called twice per forward (weight sharing) has no per-call closed form
            for name in [n for n, calls in captured.items() if len(calls) != 1]:
                if name in self.fast:
                    _, weight_key, bias_key = self.fast.pop(name)
                    self.fallback_keys += [k for k in (weight_key, bias_key) if k is not None]
            names = [n for n in captured if n in self.fast]
            for index, (draw, weight) in enumerate(draws):
                if names:
                    nll = self.likelihood.nll(outputs, draw)
                    total = (nll if weight is None else nll * weight).sum()
                    output_grads = torch.autograd.grad(
                        total, [captured[n][0][1] for n in names], allow_unused=True,
                        retain_graph=index < len(draws) - 1)
                    for name, out_grad in zip(names, output_grads, strict=True):
                        if out_grad is None:  # layer does not influence the output
                            continue
                        module, weight_key, bias_key = self.fast[name]
                        layer_input = captured[name][0][0]
                        self._add_closed_form(module, layer_input, out_grad, fisher,
                                              weight_key, bias_key)
                if self.fallback_keys:
                    self._add_fallback(inputs, draw.detach(), weight, fisher)

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
        if type(module) in _BATCH_NORMS:  # y = x̂·w + b, x̂ from the running statistics
            view = (1, -1) + (1,) * (x.dim() - 2)
            x_hat = (x - module.running_mean.float().view(view)) * torch.rsqrt(
                module.running_var.float().view(view) + module.eps)
            extra = tuple(range(2, x.dim()))  # spatial / sequence dims: summed per example
            grad_w = (g * x_hat).sum(extra) if extra else g * x_hat
            grad_b = g.sum(extra) if extra else g
            fisher[weight_key] += (grad_w**2).sum(0)
            fisher[bias_key] += (grad_b**2).sum(0)
            return
        # Conv2d via unfold: per-example grad_w = G_i U_iᵀ with U_i the im2col patches
        weight = fisher[weight_key]
        g = g.reshape(g.shape[0], g.shape[1], -1)  # (B, out, L)
        for start in range(0, x.shape[0], self.chunk_size):
            patches = F.unfold(x[start : start + self.chunk_size], module.kernel_size,
                               dilation=module.dilation, padding=module.padding,
                               stride=module.stride)  # (b, in*kh*kw, L)
            gs = g[start : start + self.chunk_size]
            if gs.shape[2] == 1:  # one output position: Linear's (G∘G)ᵀ (U∘U)
                weight += ((gs[:, :, 0] ** 2).T @ (patches[:, :, 0] ** 2)).reshape(weight.shape)
            else:
                per_example = torch.bmm(gs, patches.transpose(1, 2))  # (b, out, in*kh*kw)
                weight += (per_example**2).sum(0).reshape(weight.shape)
            if bias_key is not None:
                fisher[bias_key] += (gs.sum(2) ** 2).sum(0)

    def _add_fallback(self, inputs: Any, targets: Tensor, weights: Tensor | None,
                      fisher: dict[str, Tensor]) -> None:
        """Per-example gradients of the remaining parameters with torch.func.vmap(grad), each
        example's loss times its ``weights`` entry (None: 1)."""
        model = self.model
        wanted = {k: p.detach() for k, p in model.named_parameters() if k in self.fallback_keys}
        fixed = {k: p.detach() for k, p in model.named_parameters() if k not in wanted}
        fixed.update(dict(model.named_buffers()))
        likelihood = self.likelihood

        def example_loss(trainable: dict[str, Tensor], x: Any, y: Tensor, w: Tensor) -> Tensor:
            one = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
            args, kwargs = ((), one) if isinstance(one, Mapping) else (
                (tuple(one) if isinstance(one, tuple | list) else (one,)), {})
            out = functional_call(model, {**fixed, **trainable}, args, kwargs)
            return likelihood.nll(_as_tensor(out), y.unsqueeze(0)).sum() * w

        if weights is None:
            weights = torch.ones(targets.shape[0], device=targets.device)
        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0, 0),
                           chunk_size=self.chunk_size)
        for key, values in per_example(wanted, inputs, targets, weights).items():
            fisher[key] += (values.float() ** 2).sum(0)


def iterate_batches(inputs: Tensor, targets: Tensor, batch_size: int
                    ) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive ``(inputs, targets)`` slices of ``batch_size`` examples (the last shorter)."""
    for start in range(0, inputs.shape[0], batch_size):
        yield inputs[start : start + batch_size], targets[start : start + batch_size]
