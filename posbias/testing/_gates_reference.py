"""NumPy float64 reference for data-dependent forget-gate attention biases.

Per-token, per-head log-gates ``g[b, h, t] <= 0`` are made from the layer input
``x`` by one linear map ``z = x @ weight + bias`` (``x``: ``(B, L, E)``,
``weight``: ``(E, H)``, ``bias``: ``(H,)``) followed by a non-positive squashing:

* FoX, Forgetting Transformer (Lin et al. 2025, arXiv:2503.02130, official code
  github.com/zhixuan-lin/forgetting-transformer):
  ``f_t = sigmoid(w_f·x_t + b_f)``, ``g_t = log f_t = logsigmoid(z_t)``.
* CABLE, Context-aware Biases for Length Extrapolation (Veisi, Amirzadeh,
  Mansourian 2025, arXiv:2503.08067, official code github.com/axiomlab/Cable):
  ``g_t = -softplus(z_t)``; note ``-softplus(z) == logsigmoid(-z)``, so CABLE is
  FoX with the projection negated.

With ``G = cumsum(g)`` along the sequence, the additive attention bias is
``bias[b, h, i, j] = G[b, h, i] - G[b, h, j] = sum_{s=j+1..i} g[b, h, s]`` for
``j <= i`` (zero on the diagonal). The bidirectional form of x-transformers'
``DataDependentAlibi`` uses a second gate set ``g_after`` for ``j > i``:
``bias[b, h, i, j] = sum_{s=i+1..j} g_after[b, h, s]``.

Self-attention only (query length == key length). Everything is float64.
Run ``python -m posbias.testing._gates_reference`` to compare against
x-transformers (needs torch and x-transformers).
"""

from __future__ import annotations

import numpy as np

__all__ = ["attention_reference", "cable_log_gates", "fox_log_gates", "gate_bias"]


def _logits(x, weight, bias) -> np.ndarray:
    """``z[b, h, l] = sum_e x[b, l, e] · weight[e, h] + bias[h]`` in float64."""
    x = np.asarray(x, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    bias = np.asarray(bias, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x must be (B, L, embed_dim), got shape {x.shape}")
    if weight.ndim != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be (embed_dim={x.shape[-1]}, H), got shape {weight.shape}")
    if bias.shape != (weight.shape[1],):
        raise ValueError(f"bias must be ({weight.shape[1]},), got shape {bias.shape}")
    return np.einsum("ble,eh->bhl", x, weight) + bias[None, :, None]


def fox_log_gates(x, weight, bias) -> np.ndarray:
    """FoX log forget gates, ``(B, H, L)`` float64, all ``<= 0``.

    ``g[b, h, t] = log sigmoid(x[b, t] · weight[:, h] + bias[h])``
    (Lin et al. 2025, "Forgetting Transformer: Softmax Attention with a Forget
    Gate", arXiv:2503.02130; official ``fgate_proj = nn.Linear(hidden, num_heads,
    bias=True)`` followed by ``F.logsigmoid``). Computed stably as
    ``-logaddexp(0, -z)``.

    Args:
        x: ``(B, L, embed_dim)``.
        weight: ``(embed_dim, num_heads)`` (the transpose of a torch ``Linear.weight``).
        bias: ``(num_heads,)``.
    """
    z = _logits(x, weight, bias)
    return -np.logaddexp(0.0, -z)


def cable_log_gates(x, weight, bias) -> np.ndarray:
    """CABLE per-token biases, ``(B, H, L)`` float64, all ``<= 0``.

    ``g[b, h, t] = -softplus(x[b, t] · weight[:, h] + bias[h])``
    (Veisi et al. 2025, "Context-aware Biases for Length Extrapolation",
    arXiv:2503.08067; official code: ``b = cumsum(-F.softplus(self.h_attn(x)), dim=1)``
    with ``h_attn = nn.Linear(n_embd, n_head)``, no extra slope or scale).
    Computed stably as ``-logaddexp(0, z)``.

    Args:
        x: ``(B, L, embed_dim)``.
        weight: ``(embed_dim, num_heads)`` (the transpose of a torch ``Linear.weight``).
        bias: ``(num_heads,)``.
    """
    z = _logits(x, weight, bias)
    return -np.logaddexp(0.0, z)


def gate_bias(g, g_after=None) -> np.ndarray:
    """Cumulative-gate attention bias, ``(..., L, L)`` float64 (``(B, H, L, L)`` for ``(B, H, L)``).

    With ``G = cumsum(g, axis=-1)`` and ``G_after = cumsum(g_after, axis=-1)``::

        bias[..., i, j] = G[i] - G[j]             = sum_{s=j+1..i} g[s]        (j <= i)
        bias[..., i, j] = G_after[j] - G_after[i] = sum_{s=i+1..j} g_after[s]  (j > i)

    and ``bias[..., i, j] = 0`` for ``j > i`` when ``g_after`` is None (causal form;
    the upper triangle is then expected to be masked). The diagonal is 0. This is
    FoX's ``D_ij`` (arXiv:2503.02130) / CABLE's bias (arXiv:2503.08067) in the
    lower triangle, and x-transformers' bidirectional ``DataDependentAlibi``
    (``fwd.tril() + bwd.triu()``) when ``g_after`` is given.

    Args:
        g: log-gates ``(..., L)``, normally ``(B, H, L)``.
        g_after: optional second gate set of the same shape, for keys after the query.
    """
    g = np.asarray(g, dtype=np.float64)
    if g.ndim < 1:
        raise ValueError("g must have a sequence axis (last)")
    cum = np.cumsum(g, axis=-1)
    bias = np.tril(cum[..., :, None] - cum[..., None, :])
    if g_after is not None:
        g_after = np.asarray(g_after, dtype=np.float64)
        if g_after.shape != g.shape:
            raise ValueError(f"g_after shape {g_after.shape} != g shape {g.shape}")
        cum_after = np.cumsum(g_after, axis=-1)
        bias = bias + np.triu(cum_after[..., None, :] - cum_after[..., :, None], k=1)
    return bias


def attention_reference(q, k, v, g, g_after=None, causal=True) -> np.ndarray:
    """Softmax attention with the gate bias, ``(B, H, L, D)`` float64.

    ``out = softmax(q kᵀ / sqrt(D) + gate_bias(g, g_after) [+ causal mask]) v``,
    the causal mask setting scores with ``j > i`` to ``-inf`` (FoX's Forgetting
    Attention, arXiv:2503.02130, eq. ``o_i = sum_j exp(q_i·k_j/sqrt(D) + D_ij) v_j / norm``).

    Args:
        q, k, v: ``(B, H, L, D)`` (same L: self-attention).
        g: log-gates ``(B, H, L)``.
        g_after: second gate set ``(B, H, L)`` for the bidirectional form; must be
            None when ``causal`` (it would be masked anyway).
        causal: mask keys after the query.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k, v must be (B, H, L, D) alike; got {q.shape}, {k.shape}, {v.shape}")
    if np.shape(g) != q.shape[:3]:
        raise ValueError(f"g must be {q.shape[:3]}, got {np.shape(g)}")
    if causal and g_after is not None:
        raise ValueError("g_after is only meaningful with causal=False")
    scores = np.einsum("bhid,bhjd->bhij", q, k) / np.sqrt(q.shape[-1])
    scores = scores + gate_bias(g, g_after)
    if causal:
        length = q.shape[2]
        scores = np.where(np.tri(length, dtype=bool), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bhij,bhjd->bhid", probs, v)


def _self_check() -> None:  # pragma: no cover - manual comparison against x-transformers
    import torch
    from x_transformers.x_transformers import Attention, DataDependentAlibi

    torch.manual_seed(0)
    dim, heads, dim_head, length = 32, 4, 8, 7
    x = torch.randn(2, length, dim, dtype=torch.float64)
    x_np = x.numpy()
    lower = np.tri(length, dtype=bool)

    # causal: Linear(dim, heads), bias init 5, logsigmoid
    dda = DataDependentAlibi(dim, heads, causal=True).double()
    linear = dda.to_forget_gates[0]
    w, b = linear.weight.detach().numpy().T, linear.bias.detach().numpy()
    with torch.no_grad():
        ref = dda(x).numpy()
    ours = gate_bias(fox_log_gates(x_np, w, b))
    print("causal        max|diff| j<=i:", np.abs(ours - ref)[..., lower].max())
    print(
        "causal        x-transformers upper triangle (masked later), max:", ref[..., ~lower].max()
    )

    # bidirectional: Linear(dim, 2*heads); first `heads` outputs are g, last `heads` g_after
    dda = DataDependentAlibi(dim, heads, causal=False).double()
    linear = dda.to_forget_gates[0]
    w, b = linear.weight.detach().numpy().T, linear.bias.detach().numpy()
    with torch.no_grad():
        ref = dda(x).numpy()
    g = fox_log_gates(x_np, w[:, :heads], b[:heads])
    g_after = fox_log_gates(x_np, w[:, heads:], b[heads:])
    print("bidirectional max|diff| all  :", np.abs(gate_bias(g, g_after) - ref).max())

    # whole attention: x-transformers Attention(data_dependent_alibi=True) probabilities @ v
    for causal in (True, False):
        attn = Attention(
            dim, heads=heads, dim_head=dim_head, causal=causal, data_dependent_alibi=True
        ).double()
        with torch.no_grad():
            _, inter = attn(x, return_intermediates=True)
            q, k, v = (
                proj(x).reshape(2, length, heads, dim_head).permute(0, 2, 1, 3).numpy()
                for proj in (attn.to_q, attn.to_k, attn.to_v)
            )
        ref = np.einsum("bhij,bhjd->bhid", inter.post_softmax_attn.numpy(), v)
        linear = attn.data_dependent_alibi.to_forget_gates[0]
        w, b = linear.weight.detach().numpy().T, linear.bias.detach().numpy()
        if causal:
            out = attention_reference(q, k, v, fox_log_gates(x_np, w, b), causal=True)
        else:
            g = fox_log_gates(x_np, w[:, :heads], b[:heads])
            g_after = fox_log_gates(x_np, w[:, heads:], b[heads:])
            out = attention_reference(q, k, v, g, g_after, causal=False)
        print(f"Attention causal={causal!s:5} max|diff| out:", np.abs(out - ref).max())

    # CABLE == FoX with negated projection
    w, b = np.random.default_rng(0).normal(size=(dim, heads)), np.linspace(-3, 3, heads)
    diff = np.abs(cable_log_gates(x_np, w, b) - fox_log_gates(x_np, -w, -b)).max()
    print("cable(w, b) vs fox(-w, -b)   :", diff)


if __name__ == "__main__":
    _self_check()
