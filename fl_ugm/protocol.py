"""The message contract between FedUGM and its clients (docs/design.md §4).

Every record and config key the two sides exchange is defined here, with the pure builder
and parser of a UGM reply; the client helpers (``fl_ugm.client``), the strategy
(``fl_ugm.strategy``) and the removal code (``fl_ugm.server_removal``) all use them.

Server → client, ``train`` (Flower's FedAvg layout; the record names follow the strategy's
``arrayrecord_key`` and ``configrecord_key``, "arrays" and "config" by default)::

    {"arrays": ArrayRecord(the global state dict),
     "config": ConfigRecord({"server-round": r, UGM_KEY: True, FISHER_KEY: "sampled",
                             PRIOR_KEY: δ, [REMOVAL_KEY: True], [DUAL_STEP_KEY: ρ],
                             ...the run's train config}),
     [PRIOR_RECORD: ArrayRecord(H0 per parameter, float32: δ + the carried precision)]}

With ``PRIOR_RECORD`` (FedUGM's ``carried_precision``) the client's proximal prior is that
per-coordinate precision instead of the scalar δ; a parameter it does not name gets δ.
With ``DUAL_STEP_KEY`` (FedUGM's ``client_dual_step``) the client keeps a dual variable
across rounds and sends the corrected Δ' in place of Δ (``fl_ugm.client_duals``).

Client → server, the UGM reply::

    {DELTA_RECORD:   ArrayRecord(Δ = θ_t − θ for the trained float entries of the global),
     FISHER_RECORD:  ArrayRecord(F_t for the trained parameters: a SUM over the n_t
                                 examples, ≥ 0),
     "metrics":      MetricRecord({NUM_EXAMPLES_KEY: n_t, ...}),   # the only MetricRecord
     CLIENT_RECORD:  ConfigRecord({CLIENT_ID_KEY: "<stable id>"}),  # for the ledger
     [SCALES_RECORD: ConfigRecord({"delta/<key>": s, "fisher/<key>": s, ...})]}  # float16

The delta covers the trainable parameters and the float buffers of the modules that train;
entries of the global it does not cover (a frozen backbone) keep the global's value. Delta
entries without a Fisher are buffers (e.g. BatchNorm running statistics). Every reply of a
round must cover the same keys (:func:`parse_ugm_replies`).

The wire dtype (``WIRE_DTYPE_KEY`` in the train config; absent = "float32"): "float32"
sends Δ in the global's dtype and F in float32; "float16" sends every tensor x as the
float16 values x / s with s = max|x| / 2¹⁵ in ``SCALES_RECORD`` (so each tensor keeps a
relative precision of 2⁻¹¹ over 29 binades below its largest entry: a Fisher's range is
kept), half the bytes. The server decodes to float32 before it merges.

A QUERY message is answered with ``{CLIENT_RECORD: ConfigRecord({CLIENT_ID_KEY: ...})}`` so
that the server can find a client's node. These names are stable across versions: deployed
clients and servers of different fl_ugm versions must still talk.
"""

from __future__ import annotations

import io
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor

from fl_ugm.engine import CLIENT_ID_PATTERN, WIRE_DTYPES, Contribution, RunSettings

# --------------------------------------------------------------------------- server → client
#: The train config asks for a UGM reply (delta + Fisher) instead of FedAvg's "arrays".
UGM_KEY = "ugm"
#: Which Fisher estimator the client should use (``fl_ugm.engine.FISHER_ESTIMATORS``).
FISHER_KEY = "ugm-fisher"
#: δ, the precision of the prior centred on the global, on the SUMMED loss (a Fisher's units).
PRIOR_KEY = "ugm-prior"
#: Set in an online-removal request: fine-tune from the global as usual; the reply feeds the
#: removal update, not a merge.
REMOVAL_KEY = "ugm-removal"
#: FedProx's μ (Flower's FedProx sends it): a proximal term on the MEAN loss.
FEDPROX_MU_KEY = "proximal-mu"
#: Flower's FedAvg puts the server round in every train config; clients may seed with it.
SERVER_ROUND_KEY = "server-round"
#: Optional ArrayRecord of the train message: the prior precision per parameter entry (on
#: the summed loss), replacing δ in the client's proximal term.
PRIOR_RECORD = "ugm-prior-precision"
#: The dtype the server asks clients to send Δ and F in (one of WIRE_DTYPES: "float32" as is;
#: "float16" scaled per tensor, module docstring).
WIRE_DTYPE_KEY = "ugm-wire-dtype"
#: Train-config key: ρ of client dual variables (``fl_ugm.client_duals``); absent or 0 = off.
DUAL_STEP_KEY = "ugm-dual-step"

# --------------------------------------------------------------------------- client → server
DELTA_RECORD = "delta"
FISHER_RECORD = "fisher"
METRICS_RECORD = "metrics"
#: Flower's default ``weighted_by_key``: the client's number of training examples.
NUM_EXAMPLES_KEY = "num-examples"
#: UGM and QUERY replies carry the client's stable id as ConfigRecord CLIENT_RECORD =
#: {CLIENT_ID_KEY: str}: the ledger keys contributions by it (Flower's node ids change when
#: a SuperNode restarts).
CLIENT_RECORD = "client"
CLIENT_ID_KEY = "client-id"
#: The per-tensor scales of a float16 reply: "delta/<key>" and "fisher/<key>" → s (a float).
SCALES_RECORD = "ugm-scales"
#: float16 values are x / s with s = max|x| / _FLOAT16_TOP; 2¹⁵ leaves headroom below 65504.
_FLOAT16_TOP = 2.0**15
#: The largest scale whose float16 values (≤ 65504) stay finite in float32.
_FLOAT16_SCALE_MAX = float(torch.finfo(torch.float32).max) / 65504.0

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class InvalidReply(ValueError):
    """A client's reply breaks the contract; the message says how."""


@dataclass
class ParsedReply:
    """One validated UGM reply: the node it came from, its :class:`Contribution` (Δ_t for
    the float entries it trained, F_t a float32 sum over its n_t examples for the
    parameters, keyed like the global state dict; the stable client id it carried, if any)
    and the message content (for Flower's metric aggregation)."""

    node_id: int
    contribution: Contribution
    content: RecordDict

    @property
    def client_id(self) -> str | None:
        return self.contribution.client_id


@dataclass(frozen=True)
class DroppedReply:
    """A reply that was not merged, and why."""

    node_id: int
    client_id: str | None
    reason: str


# --------------------------------------------------------------------------- server side


def ugm_train_config(config: ConfigRecord, settings: RunSettings, *, removal: bool = False
                     ) -> ConfigRecord:
    """``config`` plus the keys that ask a client for a UGM reply under the run's
    ``settings`` (in place; returned). An online-removal request (``removal``) asks for
    float32 (one reply, whose exactness matters) and no dual step."""
    config[UGM_KEY] = True
    config[FISHER_KEY] = settings.fisher
    config[PRIOR_KEY] = float(settings.prior_precision)
    config[WIRE_DTYPE_KEY] = "float32" if removal else settings.wire_dtype
    if removal:
        config[REMOVAL_KEY] = True
    elif settings.client_dual_step:
        config[DUAL_STEP_KEY] = float(settings.client_dual_step)
    return config


def parse_ugm_reply(
    content: RecordDict,
    global_state: Mapping[str, Tensor],
    *,
    node_id: int,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
) -> ParsedReply:
    """Check a reply against the contract and the global it answers; raise
    :class:`InvalidReply` with the reason if it breaks it.

    Checked here: the records are present, there is one MetricRecord whose
    ``weighted_by_key`` is a finite number > 0, the delta covers a non-empty subset of the
    global's float entries (in their dtypes, or float16 with a scale each), the Fisher a
    non-empty subset of the delta's keys, shapes match and every array is a float. Values
    (NaN, Inf, a negative Fisher) are checked during the merge, for free, by the fused
    kernel. float32 tensors are zero-copy views of the message bytes; float16 ones are
    decoded to the global's dtype (delta) and float32 (Fisher).
    """
    arrays = content.array_records
    for key in (DELTA_RECORD, FISHER_RECORD):
        if key not in arrays:
            raise InvalidReply(
                f"the reply has no '{key}' ArrayRecord (records: {sorted(content)}); is the "
                "ClientApp using fl_ugm.client.ugm_reply or handle_train?"
            )
    metric_records = content.metric_records
    if len(metric_records) != 1:
        raise InvalidReply(f"expected one MetricRecord, got {len(metric_records)}.")
    num_examples = next(iter(metric_records.values())).get(weighted_by_key)
    if not isinstance(num_examples, int | float) or isinstance(num_examples, bool):
        raise InvalidReply(f"'{weighted_by_key}' is {num_examples!r}, not a number.")
    if not (math.isfinite(num_examples) and num_examples > 0):
        raise InvalidReply(f"'{weighted_by_key}' = {num_examples}; it must be > 0.")

    float_keys = {k for k, v in global_state.items() if v.is_floating_point()}
    delta_record, fisher_record = arrays[DELTA_RECORD], arrays[FISHER_RECORD]
    unexpected = sorted(set(delta_record.keys()) - float_keys)
    if not delta_record.keys() or unexpected:
        raise InvalidReply(
            "the delta must cover a non-empty subset of the global model's float entries "
            f"(unexpected: {unexpected[:5]}); is the client's model the server's?")
    outside = sorted(set(fisher_record.keys()) - set(delta_record.keys()))
    if not fisher_record.keys() or outside:
        raise InvalidReply("the Fisher must cover a non-empty subset of the delta's keys "
                           f"(not in the delta: {outside[:5]}).")
    scales = content.config_records.get(SCALES_RECORD)
    delta = _checked_tensors(DELTA_RECORD, delta_record, global_state, scales, same_dtype=True)
    fisher = _checked_tensors(FISHER_RECORD, fisher_record, global_state, scales,
                              same_dtype=False)
    client_id = client_id_of(content)
    if client_id is not None and not CLIENT_ID_PATTERN.match(client_id):
        raise InvalidReply(f"client id {client_id!r} must be 1-128 letters, digits, '.', '_' or "
                           "'-' (not '.' or '..'): it names the client's files in the ledger.")
    return ParsedReply(node_id, Contribution(client_id, float(num_examples), delta, fisher),
                       content)


def parse_ugm_replies(
    replies: Iterable[Message],
    global_state: Mapping[str, Tensor],
    *,
    weighted_by_key: str = NUM_EXAMPLES_KEY,
) -> tuple[list[ParsedReply], list[DroppedReply]]:
    """(valid updates, dropped replies with their reasons) of one round's error-free replies.

    Besides :func:`parse_ugm_reply`, every update must cover the same keys: the same delta
    key set and the same Fisher key set (the keys it has are the parameters; the other delta
    keys are buffers). The key sets sent by the most replies win, so one odd client cannot
    drop the others. **Tie rule:** between key sets sent by equally many replies, the ones
    whose replies hold more examples (Σ ``weighted_by_key``) win; if that ties too, the
    larger Fisher key set, then the larger delta key set, then the first in sorted order, so
    the choice never depends on the order the replies arrived in.
    """
    updates: list[ParsedReply] = []
    dropped: list[DroppedReply] = []
    for message in replies:
        node = message.metadata.src_node_id
        try:
            updates.append(parse_ugm_reply(message.content, global_state, node_id=node,
                                           weighted_by_key=weighted_by_key))
        except InvalidReply as err:
            dropped.append(DroppedReply(node, client_id_of(message.content), str(err)))
        except Exception as err:  # whatever a client sent must not stop the server
            dropped.append(DroppedReply(node, client_id_of(message.content),
                                        f"it could not be read ({type(err).__name__}: {err})."))
    if not updates:
        return updates, dropped
    count = Counter(_covered(u) for u in updates)
    examples: dict[tuple[frozenset[str], frozenset[str]], float] = defaultdict(float)
    for update in updates:
        examples[_covered(update)] += update.contribution.num_examples
    expected = min(count, key=lambda keys: (-count[keys], -examples[keys], -len(keys[1]),
                                            -len(keys[0]), sorted(keys[1]), sorted(keys[0])))
    kept = []
    for update in updates:
        if _covered(update) == expected:
            kept.append(update)
        else:
            dropped.append(DroppedReply(
                update.node_id, update.client_id,
                f"it covers {len(update.contribution.delta)} delta and "
                f"{len(update.contribution.fisher)} Fisher tensors "
                f"(other keys), the other clients {len(expected[0])} and {len(expected[1])}."))
    return kept, dropped


def _covered(update: ParsedReply) -> tuple[frozenset[str], frozenset[str]]:
    """The (delta keys, Fisher keys) a reply covers."""
    return frozenset(update.contribution.delta), frozenset(update.contribution.fisher)


def client_id_of(content: RecordDict) -> str | None:
    """The client id a reply's content carries (``CLIENT_RECORD``; a non-string is shown as
    its repr, which no valid id matches), or None."""
    client_id = content.config_records.get(CLIENT_RECORD, {}).get(CLIENT_ID_KEY)
    return client_id if client_id is None or isinstance(client_id, str) else repr(client_id)


def client_id_of_query_reply(reply: Message) -> str | None:
    """The stable client id a QUERY reply carries, or None (an error, no id, an invalid one)."""
    client_id = None if reply.has_error() else client_id_of(reply.content)
    return client_id if client_id is not None and CLIENT_ID_PATTERN.match(client_id) else None


# --------------------------------------------------------------------------- client side


def ugm_requested(config: ConfigRecord) -> bool:
    """True when the server (FedUGM) asks for a delta + Fisher reply."""
    return bool(config.get(UGM_KEY, False))


def proximal_precision(content: RecordDict | ConfigRecord, num_examples: int,
                       configrecord_key: str = "config") -> float | dict[str, Tensor]:
    """Precision of the proximal prior on the SUMMED loss, from a train message's content (its
    ``configrecord_key`` config and optional ``PRIOR_RECORD``) or its config alone: per
    parameter δ + the carried precision (``PRIOR_RECORD``, FedUGM), δ (FedUGM), μ·n
    (FedProx), or 0."""
    if isinstance(content, ConfigRecord):
        config, record = content, None
    else:
        config = content.config_records.get(configrecord_key, ConfigRecord())
        record = content.array_records.get(PRIOR_RECORD)
    if ugm_requested(config):
        value = float(config.get(PRIOR_KEY, 0.0))
    elif FEDPROX_MU_KEY in config:
        value = float(config[FEDPROX_MU_KEY]) * num_examples
    else:
        return 0.0
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"the server asked for a proximal precision of {value}; need ≥ 0.")
    if record is None or not ugm_requested(config):
        return value
    per_entry = record.to_torch_state_dict()
    if any(not bool(torch.isfinite(v).all() and (v >= 0).all()) for v in per_entry.values()):
        raise ValueError(f"the server's {PRIOR_RECORD} has NaN/Inf or negative entries.")
    return per_entry


def build_ugm_reply(
    delta: Mapping[str, Tensor],
    fisher: Mapping[str, Tensor],
    metrics: MetricRecord,
    client_id: str | None,
    wire_dtype: str = "float32",
) -> RecordDict:
    """The content of a UGM reply (see the module docstring): "float32" sends the delta in
    its dtype and the Fisher in float32; "float16" sends both scaled per tensor. Tensors on
    another device are copied to the CPU."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r}; choose one of {WIRE_DTYPES}.")
    scales = ConfigRecord()
    records = {}
    for name, values in ((DELTA_RECORD, delta), (FISHER_RECORD, fisher)):
        arrays = {}
        for key, value in values.items():
            value = value.detach().cpu()
            if wire_dtype == "float16":
                value, scales[f"{name}/{key}"] = _to_float16(value)
            elif name == FISHER_RECORD:
                value = value.float()
            arrays[key] = value.contiguous()
        records[name] = ArrayRecord(arrays)
    content = RecordDict({**records, METRICS_RECORD: metrics})
    if wire_dtype == "float16":
        content[SCALES_RECORD] = scales
    if client_id is not None:
        content[CLIENT_RECORD] = ConfigRecord({CLIENT_ID_KEY: str(client_id)})
    return content


def _to_float16(value: Tensor) -> tuple[Tensor, float]:
    """(float16 values x / s, s) with s = max|x| / 2¹⁵ (1 for an all-zero or non-finite x,
    whose NaN/Inf then reach the server's checks unchanged)."""
    value = value.float()
    top = float(value.abs().max()) if value.numel() else 0.0
    scale = top / _FLOAT16_TOP if math.isfinite(top) and top > 0 else 1.0
    return (value / scale).half(), scale


def query_reply_content(client_id: str) -> RecordDict:
    """The content of the answer to a QUERY: the client's stable id."""
    return RecordDict({CLIENT_RECORD: ConfigRecord({CLIENT_ID_KEY: str(client_id)})})


# --------------------------------------------------------------------------- internals


def _checked_tensors(name: str, record: ArrayRecord, global_state: Mapping[str, Tensor],
                     scales: ConfigRecord | None, *, same_dtype: bool) -> dict[str, Tensor]:
    """The record's tensors, decoded (their bytes must hold what the Array declares),
    checked against the global (shape; dtype: the global's for a delta, any float for a
    Fisher) and decoded from float16 when ``scales`` is given."""
    out = {}
    for key, array in record.items():
        expected = global_state[key]
        if tuple(array.shape) != tuple(expected.shape):
            raise InvalidReply(f"{name}['{key}'] has shape {tuple(array.shape)}, the global "
                               f"{tuple(expected.shape)}.")
        if scales is not None:
            out[key] = _from_float16(name, key, array, scales, expected.dtype if same_dtype
                                     else torch.float32)
            continue
        wanted = str(expected.dtype).removeprefix("torch.")
        if same_dtype and array.dtype != wanted:
            raise InvalidReply(f"{name}['{key}'] has dtype {array.dtype}, the global {wanted}.")
        if array.dtype not in _FLOAT_DTYPES:
            raise InvalidReply(f"{name}['{key}'] has dtype {array.dtype}; expected a float.")
        out[key] = _decoded(name, key, array)
    return out


def _from_float16(name: str, key: str, array: Array, scales: ConfigRecord,
                  dtype: torch.dtype) -> Tensor:
    """A float16 wire tensor times its scale, in ``dtype``."""
    scale = scales.get(f"{name}/{key}")
    if array.dtype != "float16":
        raise InvalidReply(f"{name}['{key}'] has dtype {array.dtype} in a float16 reply.")
    if not isinstance(scale, float) or not (0 < scale <= _FLOAT16_SCALE_MAX):
        raise InvalidReply(f"{name}['{key}'] has no valid scale in '{SCALES_RECORD}' "
                           f"(got {scale!r}; a scale is > 0 and keeps float16 values finite "
                           "in float32).")
    return (_decoded(name, key, array).float() * scale).to(dtype)


def _decoded(name: str, key: str, array: Array) -> Tensor:
    """The tensor an Array's bytes hold, which must be what the Array declares."""
    try:
        tensor = tensor_view(array)
    except Exception as err:  # any malformed bytes
        raise InvalidReply(f"{name}['{key}'] cannot be decoded ({type(err).__name__}: "
                           f"{err}).") from None
    held = str(tensor.dtype).removeprefix("torch.")
    if tuple(tensor.shape) != tuple(array.shape) or held != array.dtype:
        raise InvalidReply(f"{name}['{key}'] declares {array.dtype} {tuple(array.shape)} but "
                           f"its bytes hold {held} {tuple(tensor.shape)}.")
    return tensor


def tensor_view(array: Array) -> Tensor:
    """A read-only tensor over the bytes of a serialized NumPy ``Array``, without a copy
    (a Fortran-ordered array is copied into C order).

    ``Array.numpy()`` deserializes into a fresh array; the strategy holds every reply's
    delta and Fisher at once, so a copy would double the memory of a round. Raises
    ``InvalidReply`` or numpy's errors for bytes that are no native-endian numeric array of
    the size the header declares.
    """
    if array.stype != "numpy.ndarray":
        raise InvalidReply(f"unsupported array serialization {array.stype!r}.")
    header = io.BytesIO(array.data)
    version = np.lib.format.read_magic(header)
    readers = {(1, 0): np.lib.format.read_array_header_1_0,
               (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise InvalidReply(f"unsupported .npy format version {version}.")
    shape, fortran_order, dtype = readers[version](header)
    if dtype.hasobject or not dtype.isnative:
        raise InvalidReply(f"unsupported array dtype {dtype.str} (objects or a foreign byte "
                           "order).")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(array.data, dtype=dtype, count=count, offset=header.tell())
    with warnings.catch_warnings():  # read-only buffer: fl_ugm never writes to inputs
        warnings.simplefilter("ignore", UserWarning)
        if fortran_order:
            return torch.from_numpy(np.ascontiguousarray(flat.reshape(shape[::-1]).T))
        return torch.from_numpy(flat.reshape(shape))
