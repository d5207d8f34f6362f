"""Fused, compiled CPU kernel for the UGM merge (numba).

The merge reads one delta and one Fisher per client. Done with one torch op per client and
tensor, every op streams model-sized accumulators through memory again (≈5-10× the time of
a plain average). Here every tensor is walked in cache-sized blocks; for each block every
client is folded into block-local accumulators that stay in cache, so main memory sees each
input once and the output once. One call covers the whole model: the work items are
(tensor, block) pairs, spread over threads with ``prange``.

Tensors reach the kernel as raw addresses (``Tensor.data_ptr()``) so that no per-call
conversion (typed lists, numpy views) is needed; the caller guarantees that every tensor is
contiguous, on the CPU, of the kernel's dtype, and alive during the call.

Never compile with ``fastmath``: it lets LLVM assume there are no NaN/Inf, and the NaN/Inf
screening below depends on them propagating.
"""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np
import torch
from numba import carray, njit, prange, types
from numba.extending import intrinsic

#: Elements per block: 2 accumulators x 64 Ki float32 = 512 KiB, within one core's L2.
BLOCK_ELEMS = 65536

_INT_OF = {torch.float32: np.int32, torch.float64: np.int64}
_NUMPY_OF = {torch.float32: np.float32, torch.float64: np.float64}


@intrinsic
def _pointer_to(typingctx, address, witness):
    """Reinterpret an int64 address as a pointer to the element type of array ``witness``."""
    if not isinstance(witness, types.Array):
        return None
    signature = types.CPointer(witness.dtype)(address, witness)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@njit(parallel=True, cache=True, nogil=True)
def _ugm_kernel(
    float_witness,
    int_witness,
    base_ptrs,
    out_ptrs,
    prior_ptrs,
    prior_values,
    sizes,
    delta_ptrs,
    fisher_ptrs,
    alphas,
    item_tensor,
    item_start,
    block,
    bad_item,
):
    """out = base + Σ_t α_t (H0 + F_t) Δ_t / (H0 + Σ_t α_t F_t) for every work item.

    Per tensor m: ``prior_ptrs[m]`` is 0 for the scalar H0 ``prior_values[m]``, else the
    address of a per-element H0. ``bad_item[w]`` is set when item w saw a Fisher with the
    sign bit set (negative, or a harmless -0.0) or a non-finite input or output; the caller
    then looks closer (slow path, only on error). The sign check ORs the Fishers' bits as
    integers, which vectorises (a float min does not without fastmath).
    """
    for w in prange(item_tensor.size):
        m = item_tensor[w]
        n = sizes[m]
        start = item_start[w]
        stop = min(start + block, n)
        length = stop - start
        numerator = np.zeros(length, float_witness.dtype)  # Σ α (H0 + F) Δ
        fisher_sum = np.zeros(length, float_witness.dtype)  # Σ α F
        per_element_prior = prior_ptrs[m] != 0
        h0 = prior_values[m]
        # per-element H0 (with a scalar H0, a dummy view of base that is never read)
        h = carray(_pointer_to(prior_ptrs[m] if per_element_prior else base_ptrs[m],
                               float_witness), n)[start:stop]
        sign_bits = 0
        for t in range(alphas.size):
            a = alphas[t]
            a_h0 = a * h0
            delta = carray(_pointer_to(delta_ptrs[t, m], float_witness), n)[start:stop]
            fisher = carray(_pointer_to(fisher_ptrs[t, m], float_witness), n)[start:stop]
            fisher_bits = carray(_pointer_to(fisher_ptrs[t, m], int_witness), n)[start:stop]
            bits = fisher_bits[0]
            if per_element_prior:
                for j in range(length):
                    a_f = a * fisher[j]
                    numerator[j] += (a * h[j] + a_f) * delta[j]
                    fisher_sum[j] += a_f
                    bits |= fisher_bits[j]
            else:
                for j in range(length):
                    a_f = a * fisher[j]
                    numerator[j] += (a_h0 + a_f) * delta[j]
                    fisher_sum[j] += a_f
                    bits |= fisher_bits[j]
            sign_bits |= bits
        base = carray(_pointer_to(base_ptrs[m], float_witness), n)
        out = carray(_pointer_to(out_ptrs[m], float_witness), n)
        flagged = sign_bits < 0
        for j in range(length):
            hj = h[j] if per_element_prior else h0
            merged = base[start + j] + numerator[j] / (hj + fisher_sum[j])
            out[start + j] = merged
            # NaN/Inf in a delta or Fisher reaches numerator or fisher_sum (0·Inf = NaN)
            if not (np.isfinite(merged) and np.isfinite(fisher_sum[j])):
                flagged = True
        bad_item[w] = flagged


def ugm_merge_tensors(
    base: Sequence[torch.Tensor],
    deltas: Sequence[Sequence[torch.Tensor]],
    fishers: Sequence[Sequence[torch.Tensor]],
    alphas: Sequence[float],
    priors: Sequence[float | torch.Tensor],
    out: Sequence[torch.Tensor],
    block: int = BLOCK_ELEMS,
) -> list[bool]:
    """Fused merge of M tensors from K clients into ``out`` (M preallocated tensors).

    ``deltas[t][m]``/``fishers[t][m]`` is client t's tensor m; every tensor (and every
    tensor-valued prior) must be contiguous, on the CPU, and of ``out[0]``'s dtype (float32
    or float64). Returns one flag per tensor: True when nothing was flagged; False means
    some input may be bad (NaN/Inf, a negative or -0.0 Fisher) or the result overflowed.
    """
    dtype = out[0].dtype
    sizes = np.array([t.numel() for t in base], dtype=np.int64)
    items = [(m, start) for m, size in enumerate(sizes) for start in range(0, size, block)]
    item_tensor = np.array([m for m, _ in items], dtype=np.int64)
    bad = np.zeros(len(items), dtype=np.bool_)
    # numba's OpenMP layer shares torch's OpenMP runtime and sets its thread count: run on
    # as many threads as torch is allowed, and give torch its own count back afterwards (a
    # process limited to 1 thread otherwise trains on 2 after its first merge)
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        _ugm_kernel(
            np.empty(0, _NUMPY_OF[dtype]),
            np.empty(0, _INT_OF[dtype]),
            np.array([t.data_ptr() for t in base], dtype=np.int64),
            np.array([t.data_ptr() for t in out], dtype=np.int64),
            np.array([p.data_ptr() if isinstance(p, torch.Tensor) else 0 for p in priors],
                     dtype=np.int64),
            np.array([0.0 if isinstance(p, torch.Tensor) else p for p in priors],
                     dtype=_NUMPY_OF[dtype]),
            sizes,
            np.array([[t.data_ptr() for t in client] for client in deltas], dtype=np.int64),
            np.array([[t.data_ptr() for t in client] for client in fishers], dtype=np.int64),
            np.asarray(alphas, dtype=_NUMPY_OF[dtype]),
            item_tensor,
            np.array([start for _, start in items], dtype=np.int64),
            block,
            bad,
        )
    finally:
        torch.set_num_threads(threads)
    clean = [True] * len(base)
    for m in item_tensor[bad]:
        clean[m] = False
    return clean
