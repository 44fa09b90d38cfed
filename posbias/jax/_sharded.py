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

from .._core import bias_arg as _bias_arg
from .._core import dispatch as _dispatch
from .._core import layouts as _ring
from .._core import partial as _partial
from .._core import problem as _problem
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
    key_padding_mask: Any = None,
    scale: float | None = None,
    checkpoint_tiles: bool = True,
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
        bias: registered name, ``BiasSpec``, ``posbias.jax.PositionalBias``
            module (learnable parameters get gradients) or None.
        mesh: the ``jax.sharding.Mesh`` to run on.
        seq_axis: mesh axis the sequence is sharded over (ring attention), or None.
        head_axis: mesh axis the heads are sharded over, or None.
        causal: hide keys at later positions than the query.
        order: ``"contiguous"`` (device ``d`` holds block ``d``) or ``"zigzag"``
            (device ``d`` holds chunks ``d`` and ``2n-1-d`` of ``2n``: equal causal
            work per device). The arrays must already be in that order
            (:func:`zigzag`); the output comes back in it.
        q_pos: ``(Lq,)`` or ``(B, Lq)`` explicit global query positions in array
            order (packed documents, custom layouts); with ``causal`` a key is
            visible when its position is ``<=`` the query's. Default: from ``order``.
        k_pos: ``(Lk,)`` or ``(B, Lk)`` explicit key positions (with ``q_pos``).
        segment_ids: ``(B, L)`` integer document ids of packed sequences
            (sharded like the sequence): queries see keys of their own document
            only. Give per-document positions as ``q_pos``/``k_pos`` for the bias.
        key_padding_mask: ``(B, Lk)`` bool, True for real keys (sharded like the
            keys): padded keys, or the empty slots of a KV cache, are hidden.
            Bias positions stay those of ``order`` (or ``q_pos``/``k_pos``; for
            left padding pass ``cumsum(mask) - 1`` of the global mask).
        scale: score scale; default ``1/√D``.
        checkpoint_tiles: recompute each tile in the backward pass
            (``jax.checkpoint``) instead of keeping its scores: less memory,
            about one extra forward of compute. Off: faster backward.

    Returns:
        ``(B, Lq, H, D)`` in ``q``'s dtype, sharded like ``q``.

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
    xp = JaxBackend()
    q, k, v = (_dispatch._native(xp, t) for t in (q, k, v))
    batch, heads, kv_heads, q_len, k_len = _problem._check_qkv(xp, q, k, v, "blhd")
    seq_n, head_n = _check_mesh(mesh, seq_axis, head_axis)
    _ring.check_order(order)
    if heads % head_n:
        raise InvalidArgumentError(
            f"the query heads ({heads}) do not split over the {head_n} devices of mesh axis "
            f"{head_axis!r}; use a head count divisible by {head_n} or a smaller head axis."
        )
    if kv_heads % head_n:  # fewer key/value heads than devices: replicate them (GQA)
        k, v = (jnp.repeat(t, heads // kv_heads, axis=2) for t in (k, v))
        kv_heads = heads
    if (q_pos is None) != (k_pos is None):
        raise InvalidArgumentError("give both q_pos and k_pos, or neither.")
    decode = q_len != k_len
    given_positions = q_pos is not None
    masks = {}
    if segment_ids is not None:
        if decode:
            raise InvalidArgumentError(
                "segment_ids needs queries and keys of the same length (packed training "
                "sequences); for decoding pass q_pos/k_pos."
            )
        masks["segments"] = _check_positions("segment_ids", segment_ids, batch, k_len, batched=True)
    if key_padding_mask is not None:
        masks["real"] = _check_mask(key_padding_mask, batch, k_len)
    explicit = given_positions or decode or bool(masks)
    if masks and not decode and q_pos is None:
        q_pos = k_pos = _ring.layout_positions(k_len, seq_n, order)
    if given_positions and order != "contiguous":
        raise InvalidArgumentError(
            "explicit q_pos/k_pos already say where every token sits; leave order='contiguous'."
        )
    if not decode:
        _ring.check_divisible(q_len, seq_n, order, "the queries")
    _ring.check_divisible(k_len, seq_n, order, "the keys")
    if decode and q_pos is None:
        if causal and q_len > k_len:
            raise InvalidArgumentError(
                f"causal=True with more queries than keys ({q_len} > {k_len}); pass q_pos."
            )
        q_pos = np.arange(q_len) + (k_len - q_len)  # bottom-right, like everywhere in posbias
        k_pos = _ring.layout_positions(k_len, seq_n, order)
    if explicit:
        q_pos = _check_positions("q_pos", q_pos, batch, q_len)
        k_pos = _check_positions("k_pos", k_pos, batch, k_len)

    spec = _bias_arg.spec_of(bias, heads)
    if bias is not None:
        _bias_arg.head_bias(bias, heads, None, "jax")  # validates the bias
    params = {} if bias is None or isinstance(bias, str) else (_bias_arg.module_params(bias) or {})
    compute = "float64" if xp.dtype_name(q.dtype) == "float64" else "float32"
    plan = _Plan(
        spec=spec,
        heads=heads,
        group=heads // kv_heads,
        seq_axis=seq_axis,
        head_axis=head_axis,
        seq_n=seq_n,
        head_n=head_n,
        causal=causal,
        order=order,
        scale=float(q.shape[-1]) ** -0.5 if scale is None else float(scale),
        compute=compute,
        decode=decode,
        checkpoint_tiles=bool(checkpoint_tiles),
    )
    seq = P(None, None if decode else seq_axis, head_axis, None)
    kv = P(None, seq_axis, head_axis, None)
    mask_specs = {name: P(None, seq_axis) for name in masks}
    if explicit:
        for name, pos, sharded in (("q_pos", q_pos, not decode), ("k_pos", k_pos, True)):
            masks[name] = pos
            axis = seq_axis if sharded else None
            mask_specs[name] = P(axis) if pos.ndim == 1 else P(None, axis)
    args, specs = [q, k, v, params, masks], [seq, kv, kv, P(), mask_specs]
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


def _explicit(mesh: Any) -> bool:
    explicit = getattr(jax.sharding.AxisType, "Explicit", None)
    return explicit is not None and explicit in tuple(getattr(mesh, "axis_types", ()) or ())


class _Plan:
    """The static facts every device shares (plain attributes; hashed by identity)."""

    def __init__(self, **facts: Any) -> None:
        self.__dict__.update(facts)


def _device_attention(plan: _Plan, q, k, v, params, masks):
    """One device's share: ``(B, Lq_local, H_local, D)`` in, the same out.

    ``masks`` holds what this device has of ``q_pos``, ``k_pos``, ``segments``
    and ``real`` (the key padding mask), where given.
    """
    xp = JaxBackend()
    in_dtype = q.dtype
    q, k, v = (einops.rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
    # learnable parameters arrive replicated; marking them device-varying here puts the
    # psum of their gradient at the top level, not inside a lax.switch branch that
    # only some devices take (which would deadlock the collective)
    axes = tuple(a for a in (plan.seq_axis, plan.head_axis) if a is not None)
    if axes:
        params = jax.tree.map(lambda x: _varying(x, axes), params)
    base = functools.partial(
        _partial.tile,
        xp,
        scale=plan.scale,
        bias_fn=_local_bias(plan, params),
        compute=plan.compute,
        kv_group=plan.group,
    )

    def tile(q, k, v, *, q_pos, k_pos, causal, visible=None):
        def fn(q, k, v, q_pos, k_pos, visible):
            return base(q, k, v, q_pos=q_pos, k_pos=k_pos, causal=causal, visible=visible)

        # recompute each tile's scores in the backward pass instead of keeping them:
        # residuals are then O(L_local · D) per step, not O(L_local²)
        fn = jax.checkpoint(fn) if plan.checkpoint_tiles else fn
        return fn(q, k, v, q_pos, k_pos, visible)

    if plan.decode:
        visible = _partial.key_visibility(None, None, masks.get("real"))
        part = tile(q, k, v, q_pos=masks["q_pos"], k_pos=masks["k_pos"], causal=plan.causal,
                    visible=visible)  # fmt: skip
        out = _merge_over_devices(plan, part)
    elif masks:
        out = _ring_explicit(plan, tile, q, k, v, masks)
    else:
        out = _ring_layout(plan, tile, q, k, v)
    return einops.rearrange(out.astype(in_dtype), "b h l d -> b l h d")


def _local_bias(plan: _Plan, params: dict) -> Any:
    """The bias of this device's heads (``lax.switch`` over the head shards)."""
    if plan.spec is None:
        return None
    width = plan.heads // plan.head_n
    fns = [
        _bias_arg.head_bias(
            plan.spec, plan.heads, range(i * width, (i + 1) * width), "jax", params=params or None
        )
        for i in range(plan.head_n)
    ]
    if plan.head_n == 1:
        return fns[0]

    def bias_fn(q_pos, k_pos, dtype):
        branches = [lambda a, b, f=f: f(q_pos=a, k_pos=b, dtype=dtype) for f in fns]
        return lax.switch(lax.axis_index(plan.head_axis), branches, q_pos, k_pos)

    return bias_fn


def _shift(plan: _Plan, blocks: Any) -> Any:
    """Every device sends ``blocks`` to the next device of the ring."""
    n = plan.seq_n
    pairs = [(j, (j + 1) % n) for j in range(n)]
    return jax.tree.map(lambda x: _raw(lax.ppermute(_raw(x), plan.seq_axis, pairs), x), blocks)


def _raw(x: Any, like: Any = None) -> Any:
    """16-bit floats as uint16 bits and back (``like``): XLA on CPU would send them as float32."""
    if like is None:
        return lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x
    return lax.bitcast_convert_type(x, like.dtype) if x.dtype != like.dtype else x


def _ring_explicit(plan: _Plan, tile, q, k, v, masks):
    """Ring over key blocks with explicit positions: every tile is computed and masked."""
    xp = JaxBackend()
    acc = _partial.empty(xp, q.shape[0], q.shape[1], q.shape[2], q.shape[3], plan.compute)
    q_pos, q_seg = masks["q_pos"], masks.get("segments")
    keys = (k, v, masks["k_pos"], q_seg, masks.get("real"))  # travel together
    for step in range(plan.seq_n):
        k, v, k_pos, k_seg, k_real = keys
        visible = _partial.key_visibility(q_seg, k_seg, k_real)
        part = tile(q, k, v, q_pos=q_pos, k_pos=k_pos, causal=plan.causal, visible=visible)
        acc = _partial.merge(xp, acc, part)
        if step < plan.seq_n - 1:
            keys = _shift(plan, keys)
    return acc[0]


def _ring_layout(plan: _Plan, tile, q, k, v):
    """Ring over key blocks in a contiguous/zigzag layout, skipping hidden chunk pairs."""
    xp = JaxBackend()
    n, per = plan.seq_n, _ring.chunks_per_device(plan.order)
    size = q.shape[2] // per
    me = lax.axis_index(plan.seq_axis) if n > 1 else 0
    q_ids = _ring.chunk_ids(plan.order, n, me)
    rows = [q[:, :, a * size : (a + 1) * size] for a in range(per)]
    acc = [_partial.empty(xp, q.shape[0], q.shape[1], size, q.shape[3], plan.compute)] * per

    def positions(chunk):
        return chunk * size + jnp.arange(size)

    for step in range(n):
        k_ids = _ring.chunk_ids(plan.order, n, (me - step) % n)
        for a in range(per):
            for b in range(per):
                kb, vb = k[:, :, b * size : (b + 1) * size], v[:, :, b * size : (b + 1) * size]
                qp, kp = positions(q_ids[a]), positions(k_ids[b])

                def add(acc_a, diagonal, qa=rows[a], kb=kb, vb=vb, qp=qp, kp=kp):
                    part = tile(qa, kb, vb, q_pos=qp, k_pos=kp, causal=diagonal)
                    return _partial.merge(xp, acc_a, part)

                if not plan.causal:
                    acc[a] = add(acc[a], False)
                elif step == 0:  # own chunks, in increasing order: a static relation
                    if b <= a:
                        acc[a] = add(acc[a], b == a)
                else:
                    which = _ring.relation(q_ids[a], k_ids[b], jnp)
                    branches = [
                        functools.partial(add, diagonal=False),
                        functools.partial(add, diagonal=True),
                        lambda acc_a: acc_a,
                    ]
                    acc[a] = lax.switch(which, branches, acc[a])
        if step < n - 1:
            k, v = _shift(plan, (k, v))
    return jnp.concatenate([out for out, _ in acc], axis=2)


def _merge_over_devices(plan: _Plan, part: Any) -> Any:
    """Merge every ``seq_axis`` device's partial result (decoding)."""
    out, lse = part
    if plan.seq_n == 1:
        return out
    top = lax.stop_gradient(lax.pmax(lse, plan.seq_axis))  # a shift; the result ignores it
    weight = jnp.exp(lse - top)
    total = lax.psum(weight, plan.seq_axis)  # >= 1 on every row
    return lax.psum(out * weight[..., None], plan.seq_axis) / total[..., None]


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


def _check_mask(mask: Any, batch: int, length: int) -> jax.Array:
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise InvalidTypeError(
            f"key_padding_mask must be boolean (True for real tokens), got dtype {mask.dtype}; "
            "convert with mask.astype(bool)."
        )
    if mask.shape != (batch, length):
        raise InvalidArgumentError(
            f"key_padding_mask must have shape (B, Lk) = ({batch}, {length}), got {mask.shape}."
        )
    return mask


def _check_positions(
    name: str, pos: Any, batch: int, length: int, *, batched: bool = False
) -> jax.Array:
    pos = jnp.asarray(pos)
    if not jnp.issubdtype(pos.dtype, jnp.integer):
        raise InvalidTypeError(f"{name} must hold integers, got dtype {pos.dtype}.")
    shapes = ((batch, length),) if batched else ((length,), (batch, length))
    if pos.shape not in shapes:
        raise InvalidArgumentError(
            f"{name} must have shape {' or '.join(map(str, shapes))}, got {pos.shape}."
        )
    return pos.astype(jnp.int32)


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
    return _take(x, _ring.layout_positions(x.shape[axis], shards, "zigzag"), axis)


def unzigzag(x: Any, shards: int, axis: int = 1) -> jax.Array:
    """Undo :func:`zigzag` (back to the natural token order)."""
    return _take(x, np.argsort(_ring.layout_positions(x.shape[axis], shards, "zigzag")), axis)


def _take(x: Any, index: np.ndarray, axis: int) -> jax.Array:
    sharding = getattr(x, "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is not None and _explicit(mesh):  # a gather needs the whole axis: replicate it
        x = jax.reshard(x, NamedSharding(mesh, P()))
    return jnp.take(x, index, axis=axis)
