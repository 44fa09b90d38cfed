"""Sequence- and head-sharded attention with biases on a ``jax.sharding.Mesh``.

:func:`sharded_attention` runs inside ``jax.shard_map``: every device holds a
block of the sequence (``seq_axis``) and/or a slice of the heads
(``head_axis``) and

* computes its bias tiles itself from *global* positions and *global* head
  indices — no bias tensor is ever communicated;
* passes its key/value block around the ring of ``seq_axis`` devices with
  ``lax.ppermute`` (``n - 1`` steps), merging the partial results exactly by
  log-sum-exp (:mod:`posbias._core.partial`);
* under causal masking skips the key blocks its queries cannot see; with
  ``order="zigzag"`` (:mod:`posbias._core.layouts`) every device then does the same work.

The per-device schedule is :func:`posbias._core.ring.attend_on_ring`, shared
with :func:`posbias.torch.distributed.ring_attention`.

Queries shorter than the keys (decoding against a sequence-sharded KV cache)
are replicated over ``seq_axis``: every device attends to its cache block and
the partial results are merged with one ``pmax`` and two ``psum``.
"""

from __future__ import annotations

import functools
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .._core import conventions, layouts
from .._core import gates as _gates
from .._core import problem as _problem
from .._core.bias_arg import read_bias
from .._core.checks import check_int
from .._core.ring import DECODE_GATES, Ring, attend_on_ring, check_segment_bias, make_tile
from ..backends.jax import JaxBackend
from ..errors import BackendUnavailableError, InvalidArgumentError, InvalidTypeError


def sharded_attention(
    q: Any,
    k: Any,
    v: Any,
    bias: Any = None,
    *,
    mesh: Mesh,
    seq_axis: str | None = None,
    head_axis: str | None = None,
    causal: bool = False,
    order: str = "contiguous",
    q_pos: Any = None,
    k_pos: Any = None,
    segment_ids: Any = None,
    key_mask: Any = None,
    scale: float | None = None,
    log_gates: Any = None,
    log_gates_after: Any = None,
    checkpoint_tiles: bool = True,
    **removed: Any,
) -> jax.Array:
    """Attention with an additive bias over a device mesh; layout ``(B, L, H, D)``.

    ``out = softmax(q·kᵀ·scale + bias[h, i, j] + mask)·v`` with global positions
    ``i, j`` and global heads ``h``: the result equals single-device
    :func:`posbias.jax.attention` (to float32 rounding), forward and backward,
    under ``jax.jit``.

    Args:
        q: ``(B, Lq, H, D)`` global queries.
        k: ``(B, Lk, H_kv, D)`` global keys (``H`` a multiple of ``H_kv``).
        v: ``(B, Lk, H_kv, D)`` global values.
        bias: registered name, ``BiasSpec``, its config dict,
            ``posbias.jax.PositionalBias`` module (learnable parameters get
            gradients) or None; ``H`` heads (the global query head count).
        mesh: the ``jax.sharding.Mesh`` to run on.
        seq_axis: mesh axis the sequence is sharded over (ring attention), or None.
        head_axis: mesh axis the heads are sharded over, or None.
        causal: hide keys at later positions than the query.
        order: ``"contiguous"`` (device ``d`` holds block ``d``) or ``"zigzag"``
            (device ``d`` holds chunks ``d`` and ``2n-1-d`` of ``2n``: equal causal
            work per device). The arrays must already be in that order
            (:func:`zigzag`); the output comes back in it.
        q_pos: ``(Lq,)`` or ``(B, Lq)`` explicit bias positions of the queries, in
            array order (packed documents restarting at 0, shifted positions), as
            in :func:`posbias.jax.attention`: they set the bias only; causal
            visibility follows the sequence order given by ``order``. Default:
            ``cumsum(key_mask) - 1``, else the positions of ``order``.
        k_pos: ``(Lk,)`` or ``(B, Lk)`` explicit key positions (with ``q_pos``).
        segment_ids: ``(B, L)`` integer document ids of packed sequences
            (sharded like the sequence; documents are contiguous runs): queries
            see keys of their own document only. A Toeplitz bias (ALiBi, T5,
            KERPLE, ...) then equals single-device attention; other biases need
            the per-document positions as ``q_pos``/``k_pos``.
        key_mask: ``(B, Lk)`` bool, True for a real key (sharded like the
            keys): padded keys, or the empty slots of a KV cache, are hidden,
            and bias positions are the global ``cumsum(key_mask) - 1``, exactly
            as on one device (an exclusive scan of per-chunk counts: one
            all-gather of ``B × chunks`` integers).
        scale: score scale; default ``1/√D``.
        log_gates: ``(B, Lk, H)`` per-token log-gates ``g <= 0`` (forget gates:
            FoX, CABLE; see :func:`posbias.jax.attention`), in the same order as
            the keys (zigzag too) and sharded like them: adds ``Σ_{s=j+1..i} g[s]``
            for keys ``j <= i``. Each device computes its chunks' local sums and
            gets the totals of every other chunk from one exchange of ``B × H``
            scalars per chunk; no pair's bias is a difference of two large sums.
            Not with fewer queries than keys (decoding).
        log_gates_after: ``(B, Lk, H)`` log-gates of keys after the query, for
            ``causal=False`` (required there with ``log_gates``).
        checkpoint_tiles: recompute each tile in the backward pass instead of
            keeping its scores (posbias's blockwise backward,
            :mod:`posbias._core.backward`; ``jax.checkpoint`` for a plain
            callable bias or a head-sharded mesh): less memory, about one extra
            forward of compute. Off: faster backward.

    Returns:
        ``(B, Lq, H, D)`` in ``q``'s dtype, sharded like ``q``.

    Raises:
        InvalidArgumentError: lengths or heads that do not split over the mesh,
            a bias of another head count, bad positions or masks.
        InvalidTypeError: not a ``Mesh``, non-floating inputs, ``key_padding_mask=``
            (the mask is ``key_mask``, True for a real key).

    Lengths must split evenly over the ``seq_axis`` devices (``2n`` chunks for
    zigzag) and query heads over ``head_axis``; otherwise a
    :class:`posbias.InvalidArgumentError` says how to pad. Key/value heads
    that do not split over ``head_axis`` are repeated up to the query heads.

    Example:
        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from jax.sharding import Mesh, NamedSharding
        >>> from posbias.jax import attention, sharded_attention
        >>> mesh = Mesh(np.array(jax.devices()[:1]), ("seq",))
        >>> q = jnp.ones((1, 8, 4, 16))
        >>> out = sharded_attention(q, q, q, "alibi", mesh=mesh, seq_axis="seq", causal=True)
        >>> bool(jnp.allclose(out, attention(q, q, q, "alibi", causal=True), atol=1e-6))
        True
    """
    if not hasattr(jax, "shard_map"):
        raise BackendUnavailableError(
            f"sharded_attention needs jax.shard_map (jax >= 0.7), this is jax {jax.__version__}; "
            "upgrade with pip install -U 'jax>=0.7' flax."
        )
    conventions.reject_unknown("posbias.jax.sharded_attention", removed, _KEYWORDS)
    xp = JaxBackend()
    q, k, v = (_problem.native(xp, n, t) for n, t in (("q", q), ("k", k), ("v", v)))
    batch, heads, kv_heads, q_len, k_len = _problem.check_qkv(xp, q, k, v, "blhd")
    seq_n, head_n = _check_mesh(mesh, seq_axis, head_axis)
    layouts.check_order(order)
    causal = conventions.check_bool("causal", causal)
    checkpoint_tiles = conventions.check_bool("checkpoint_tiles", checkpoint_tiles)
    scale = conventions.resolve_scale(scale, xp.shape(q)[-1])
    arg = read_bias(bias, heads)
    if arg is not None and (arg.spec is None or arg.points):
        raise InvalidArgumentError(
            "sharded_attention shards 1-D token positions and selects heads by global index: "
            "pass a 1-D bias with a spec (a name, a BiasSpec, its config or a PositionalBias); "
            "use posbias.jax.attention on one device for 2-D or callable biases."
        )
    if heads % head_n:
        raise InvalidArgumentError(
            f"the query heads ({heads}) do not split over the {head_n} devices of mesh axis "
            f"{head_axis!r}; use a head count divisible by {head_n} or a smaller head axis."
        )
    if kv_heads % head_n:  # fewer key/value heads than devices: replicate them (GQA)
        k, v = (jnp.repeat(t, heads // kv_heads, axis=2) for t in (k, v))
        kv_heads = heads
    conventions.both_or_neither(q_pos, k_pos, arg)
    decode = q_len != k_len
    if not decode:
        layouts.check_divisible(q_len, seq_n, order, "the queries")
    layouts.check_divisible(k_len, seq_n, order, "the keys")
    if decode and causal and q_pos is None and q_len > k_len:
        raise InvalidArgumentError(
            f"causal=True with more queries than keys ({q_len} > {k_len}); pass q_pos."
        )
    masks, mask_specs = {}, {}
    if segment_ids is not None:
        if decode:
            raise InvalidArgumentError(
                "segment_ids needs queries and keys of the same length (packed training "
                "sequences); for decoding pass q_pos/k_pos."
            )
        masks["segment_ids"] = _problem.check_mask(
            xp, "segment_ids", segment_ids, batch, k_len, boolean=False
        )
        check_segment_bias(arg, segment_ids, q_pos)
    if key_mask is not None:
        masks["key_mask"] = _problem.check_mask(
            xp, "key_mask", key_mask, batch, k_len, boolean=True
        )
    for name in masks:
        mask_specs[name] = P(None, seq_axis)
    if q_pos is not None:
        for name, pos, length, sharded in (
            ("q_pos", q_pos, q_len, not decode),
            ("k_pos", k_pos, k_len, True),
        ):
            masks[name] = _problem.read_positions(xp, name, pos, batch, length, False)
            axis = seq_axis if sharded else None
            mask_specs[name] = P(axis) if masks[name].ndim == 1 else P(None, axis)
    compute = conventions.compute_dtype(xp.dtype_name(q.dtype))
    gates = _read_gates(
        xp, log_gates, log_gates_after, masks, batch, heads, q_len, k_len, causal, seq_n, order,
        compute,
    )  # fmt: skip
    gate_spec = P(None, head_axis, seq_axis)
    params = {} if arg is None else (arg.current_params() or {})
    plan = _Plan(
        bias=arg,
        heads=heads,
        group=heads // kv_heads,
        seq_axis=seq_axis,
        head_axis=head_axis,
        seq_n=seq_n,
        head_n=head_n,
        causal=causal,
        order=order,
        scale=scale,
        compute=compute,
        checkpoint_tiles=checkpoint_tiles,
        gates=bool(gates),
    )
    seq = P(None, None if decode else seq_axis, head_axis, None)
    kv = P(None, seq_axis, head_axis, None)
    gate_specs = {name: gate_spec for name in gates}
    args = [q, k, v, params, masks, gates]
    specs = [seq, kv, kv, P(), mask_specs, gate_specs]
    if _explicit(mesh):  # explicit-sharding meshes (jax.make_mesh's default) do not reshard
        args = [
            jax.tree.map(lambda x, s: jax.reshard(x, NamedSharding(mesh, s)), arg, spec)
            if isinstance(spec, dict)
            else jax.tree.map(lambda x, s=spec: jax.reshard(x, NamedSharding(mesh, s)), arg)
            for arg, spec in zip(args, specs, strict=True)
        ]
    body = functools.partial(_device_attention, plan)
    mapped = jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=seq)
    return mapped(*args)


_KEYWORDS = (
    "mesh",
    "seq_axis",
    "head_axis",
    "causal",
    "order",
    "q_pos",
    "k_pos",
    "segment_ids",
    "key_mask",
    "scale",
    "log_gates",
    "log_gates_after",
    "checkpoint_tiles",
)


def _read_gates(
    xp, log_gates, log_gates_after, masks, batch, heads, q_len, k_len, causal, shards, order,
    compute,
) -> dict:  # fmt: skip
    """``{"before": g, "after": g'}`` ``(B, H, Lk)`` in ``compute`` (read by
    :func:`posbias._core.gates.read`, padded keys zeroed), or ``{}`` without gates."""
    segment_ids = masks.get("segment_ids")
    if segment_ids is not None and order != "contiguous":  # contiguity is in sequence order
        natural = np.argsort(layouts.layout_positions(k_len, shards, order))
        segment_ids = jnp.take(segment_ids, natural, axis=1)
    read = _gates.read(
        xp,
        log_gates,
        log_gates_after,
        layout="blhd",
        batch=batch,
        heads=heads,
        k_len=k_len,
        q_len=k_len,  # every query at its own key slot; decoding is refused below
        causal=causal,
        q_offset=0,
        key_mask=masks.get("key_mask"),
        segment_ids=segment_ids,
        compute=compute,
        native=_problem.native,
    )
    if read is None:
        return {}
    if q_len != k_len:
        raise InvalidArgumentError(DECODE_GATES)
    gates = {"before": read.before}
    if read.after is not None:
        gates["after"] = read.after
    return gates


def _explicit(mesh: Any) -> bool:
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()) or ())


class _Plan:
    """The static facts every device shares (plain attributes; hashed by identity)."""

    def __init__(self, **facts: Any) -> None:
        self.__dict__.update(facts)


class _JaxRing(Ring):
    """The ring of ``seq_axis`` devices inside ``shard_map``."""

    static = False

    def __init__(self, plan: _Plan) -> None:
        self.xp = JaxBackend()
        self.axis = plan.seq_axis
        self.n = plan.seq_n
        self.me = lax.axis_index(self.axis) if self.n > 1 else 0
        self.checkpoint_tiles = plan.checkpoint_tiles

    def shift(self, blocks):
        pairs = [(j, (j + 1) % self.n) for j in range(self.n)]
        return jax.tree.map(lambda x: _raw(lax.ppermute(_raw(x), self.axis, pairs), x), blocks)

    def gather(self, x):
        return lax.all_gather(x, self.axis) if self.n > 1 else x[None]

    def total(self, x):
        return lax.psum(x, self.axis) if self.n > 1 else x

    def top(self, x):
        return lax.stop_gradient(lax.pmax(x, self.axis))

    def sum(self, x):
        return lax.psum(x, self.axis)

    def switch(self, which, branches, operand):
        if isinstance(which, int):
            return branches[which](operand)
        return lax.switch(which, branches, operand)

    def checkpoint(self, fn):
        # recompute each tile's scores in the backward pass instead of keeping them:
        # residuals are then O(L_local · D) per step, not O(L_local²)
        return jax.checkpoint(fn) if self.checkpoint_tiles else fn


def _device_attention(plan: _Plan, q, k, v, params, masks, gates):
    """One device's share: ``(B, Lq_local, H_local, D)`` in, the same out.

    ``masks`` holds what this device has of ``q_pos``, ``k_pos``,
    ``segment_ids`` and ``key_mask``, where given; ``gates`` its log-gates
    ``(B, H_local, L_local)`` (``before``, and ``after`` when bidirectional).
    """
    in_dtype = q.dtype
    q, k, v = (einops.rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
    # learnable parameters arrive replicated; marking them device-varying here puts the
    # psum of their gradient at the top level, not inside a lax.switch branch that
    # only some devices take (which would deadlock the collective)
    axes = tuple(a for a in (plan.seq_axis, plan.head_axis) if a is not None)
    if axes:
        params = jax.tree.map(lambda x: _varying(x, axes), params)
    ring = _JaxRing(plan)
    tile = make_tile(
        ring.xp,
        _local_bias(plan, params),
        scale=plan.scale,
        compute=plan.compute,
        kv_group=plan.group,
        ring=ring,
        # the blockwise backward per tile, but for heads chosen by a traced device index
        bias=None if plan.bias is None else plan.bias.with_params(params),
        own_backward=plan.head_n == 1,
        gates=plan.gates,
    )
    out = attend_on_ring(
        ring,
        tile,
        q,
        k,
        v,
        causal=plan.causal,
        order=plan.order,
        compute=plan.compute,
        q_pos=masks.get("q_pos"),
        k_pos=masks.get("k_pos"),
        segment_ids=masks.get("segment_ids"),
        key_mask=masks.get("key_mask"),
        log_gates=(gates["before"], gates.get("after")) if gates else None,
    )
    return einops.rearrange(out.astype(in_dtype), "b h l d -> b l h d")


def _local_bias(plan: _Plan, params: dict) -> Any:
    """``bias_fn(q_pos=, k_pos=, dtype=)`` of this device's heads (``lax.switch`` over shards)."""
    if plan.bias is None:
        return None
    xp, width = JaxBackend(), plan.heads // plan.head_n
    args = [
        plan.bias.with_params(params).for_heads(range(i * width, (i + 1) * width))
        for i in range(plan.head_n)
    ]

    def bias_fn(q_pos, k_pos, dtype):
        if plan.head_n == 1:
            return args[0].tile(xp, q_pos, k_pos, dtype)
        branches = [lambda a, b, g=g: g.tile(xp, a, b, dtype) for g in args]
        return lax.switch(lax.axis_index(plan.head_axis), branches, q_pos, k_pos)

    return bias_fn


def _raw(x: Any, like: Any = None) -> Any:
    """16-bit floats as uint16 bits and back (``like``): XLA on CPU would send them as float32."""
    if like is None:
        return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x
    return lax.bitcast_convert_type(x, like.dtype) if x.dtype != like.dtype else x


def _varying(x: Any, axes: tuple[str, ...]) -> Any:
    if hasattr(lax, "pcast"):
        return lax.pcast(x, axes, to="varying")
    return lax.pvary(x, axes)  # jax < 0.8


def _check_mesh(mesh: Any, seq_axis: Any, head_axis: Any) -> tuple[int, int]:
    if not isinstance(mesh, Mesh):
        raise InvalidTypeError(
            f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}; build one with "
            "jax.make_mesh((4,), ('seq',)) or Mesh(np.array(jax.devices()), ('seq',))."
        )
    sizes = []
    for name, axis in (("seq_axis", seq_axis), ("head_axis", head_axis)):
        if axis is not None and axis not in mesh.axis_names:
            raise InvalidArgumentError(
                f"{name}={axis!r} is not an axis of the mesh; its axes are {list(mesh.axis_names)}."
            )
        sizes.append(1 if axis is None else int(mesh.shape[axis]))
    if seq_axis is not None and seq_axis == head_axis:
        raise InvalidArgumentError(
            f"seq_axis and head_axis are both {seq_axis!r}; shard sequence and heads over "
            "different mesh axes."
        )
    return sizes[0], sizes[1]


def zigzag(x: Any, shards: int, axis: int = 1) -> jax.Array:
    """Reorder the sequence axis of a global array into the zigzag layout.

    Device ``d`` of ``shards`` then holds chunks ``d`` and ``2·shards-1-d``.
    :func:`unzigzag` undoes it.

    Example:
        >>> import jax.numpy as jnp
        >>> from posbias.jax import zigzag, unzigzag
        >>> x = jnp.arange(8)[None]
        >>> zigzag(x, 2).tolist()
        [[0, 1, 6, 7, 2, 3, 4, 5]]
        >>> unzigzag(zigzag(x, 2), 2).tolist()
        [[0, 1, 2, 3, 4, 5, 6, 7]]
    """
    x, shards, axis = _zigzag_arguments(x, shards, axis)
    return _take(x, layouts.layout_positions(x.shape[axis], shards, "zigzag"), axis)


def unzigzag(x: Any, shards: int, axis: int = 1) -> jax.Array:
    """Undo :func:`zigzag` (back to the natural token order)."""
    x, shards, axis = _zigzag_arguments(x, shards, axis)
    return _take(x, np.argsort(layouts.layout_positions(x.shape[axis], shards, "zigzag")), axis)


def _zigzag_arguments(x: Any, shards: Any, axis: Any) -> tuple[jax.Array, int, int]:
    x = _problem.native(JaxBackend(), "x", x)
    shards = check_int("shards", shards, minimum=1)
    axis = check_int("axis", axis, minimum=-x.ndim, maximum=x.ndim - 1) % max(x.ndim, 1)
    return x, shards, axis


def _take(x: Any, index: np.ndarray, axis: int) -> jax.Array:
    """``x`` reordered along ``axis``; an explicitly sharded array keeps its sharding.

    A gather along a sharded axis has no unambiguous output sharding in JAX's
    explicit mode (``ShardingTypeError`` under ``jit``): replicate, gather,
    and reshard back to the input's sharding — eagerly and under ``jit`` alike.
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not _explicit(mesh):
        return jnp.take(x, index, axis=axis)
    replicated = jax.reshard(x, NamedSharding(mesh, P()))
    return jax.reshard(jnp.take(replicated, index, axis=axis), sharding)
