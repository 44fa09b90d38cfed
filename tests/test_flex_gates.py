"""``posbias.torch.gate_score_mod``: the forget-gate bias (``log_gates=``) as a
FlexAttention ``score_mod`` equals ``posbias.torch.attention(..., log_gates=g)``.

FlexAttention's forward runs on CPU eagerly and compiled; its backward runs on
CPU only eagerly (inputs without gradients, captured gates with), so the gate
gradient is checked there.
"""

from __future__ import annotations

import numpy as np
import pytest

import posbias
from posbias.errors import InvalidArgumentError, InvalidTypeError

torch = pytest.importorskip("torch")
flex = pytest.importorskip("torch.nn.attention.flex_attention")

import posbias.torch as pt  # noqa: E402

TOL = 1e-5


def _inputs(batch=2, heads=4, q_len=24, k_len=24, seed=0, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, 16, generator=gen)
    k, v = torch.randn(2, batch, heads, k_len, 16, generator=gen)
    g, g_after = -scale * torch.rand(2, batch, heads, k_len, generator=gen)
    return q, k, v, g, g_after


def _error(out, ref):
    return float((out - ref).abs().max() / ref.abs().max())


def _block_mask(batch, q_len, k_len, **kwargs):
    mod = pt.mask_mod(q_len=q_len, k_len=k_len, **kwargs)
    return flex.create_block_mask(mod, batch, None, q_len, k_len, device="cpu")


@pytest.mark.parametrize(
    "q_len, k_len, kwargs",
    [
        (24, 24, dict(causal=True)),
        (5, 24, dict(causal=True)),  # bottom-right: the queries sit at slots 19..23
        (1, 24, dict(causal=True)),  # a decode step
        (6, 24, dict(causal=True, q_offset=10)),
        (24, 24, dict(causal=False)),
    ],
    ids=["causal", "Lq<Lk", "decode", "q_offset", "bidirectional"],
)
def test_gate_score_mod_equals_attention(q_len, k_len, kwargs):
    q, k, v, g, g_after = _inputs(q_len=q_len, k_len=k_len)
    after = None if kwargs["causal"] else g_after
    ref = pt.attention(q, k, v, log_gates=g, log_gates_after=after, **kwargs)
    score_mod = pt.gate_score_mod(g, q_len, log_gates_after=after, **kwargs)
    block_mask = _block_mask(2, q_len, k_len, **kwargs)
    out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    assert _error(out, ref) <= TOL
    if kwargs["causal"] and q_len == k_len:  # the mask only, without a block mask: same
        hidden = flex.flex_attention(
            q, k, v, score_mod=_masked(score_mod, q_len, k_len), block_mask=None
        )
        assert _error(hidden, ref) <= TOL


def _masked(score_mod, q_len, k_len):
    keep = pt.mask_mod(causal=True, q_len=q_len, k_len=k_len)

    def mod(score, b, h, q_idx, kv_idx):
        return torch.where(keep(b, h, q_idx, kv_idx), score_mod(score, b, h, q_idx, kv_idx), -1e30)

    return mod


def test_gate_score_mod_composes_with_a_positional_score_mod_and_padding():
    q, k, v, g, _ = _inputs(k_len=24, q_len=24)
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    key_mask[0, :5] = False  # left padding
    key_mask[1, 20:] = False  # right padding
    spec = posbias.get("alibi", num_heads=4)
    ref = pt.attention(q, k, v, spec, causal=True, log_gates=g, key_mask=key_mask)
    score_mod = pt.gate_score_mod(
        g, 24, key_mask=key_mask, score_mod=spec.score_mod(24, 24, key_mask=key_mask)
    )
    block_mask = _block_mask(2, 24, 24, causal=True, key_mask=key_mask)
    out = flex.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask)
    real = key_mask[:, None, :, None].expand_as(out)  # padded queries see only padding
    assert float((out - ref).abs()[real].max() / ref.abs().max()) <= TOL


def test_gate_score_mod_segments_with_the_mask_mod():
    """Contiguous packed segments: the mask_mod hides other segments, and the sum
    between two tokens of one segment never leaves it."""
    q, k, v, g, _ = _inputs()
    segments = torch.tensor([[0] * 10 + [1] * 14, [0] * 3 + [1] * 15 + [2] * 6])
    ref = pt.attention(q, k, v, causal=True, log_gates=g, segment_ids=segments)
    block_mask = _block_mask(2, 24, 24, causal=True, segment_ids=segments)
    out = flex.flex_attention(q, k, v, score_mod=pt.gate_score_mod(g, 24), block_mask=block_mask)
    assert _error(out, ref) <= TOL


def test_gate_score_mod_compiled_forward():
    q, k, v, g, _ = _inputs(batch=1, q_len=128, k_len=128)
    block_mask = _block_mask(1, 128, 128, causal=True)
    compiled = torch.compile(flex.flex_attention)
    out = compiled(q, k, v, score_mod=pt.gate_score_mod(g, 128), block_mask=block_mask)
    ref = pt.attention(q, k, v, causal=True, log_gates=g)
    assert _error(out, ref) <= TOL


def test_gate_score_mod_gradient_of_the_gates_eager():
    """FlexAttention's eager CPU backward (captured tensors only) gives posbias's ``dg``."""
    q, k, v, g, _ = _inputs(batch=1, q_len=16, k_len=16)
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    grads = []
    for use_flex in (True, False):
        leaf = g.clone().requires_grad_(True)
        if use_flex:
            mod = pt.gate_score_mod(leaf, 16)
            block_mask = _block_mask(1, 16, 16, causal=True)
            out = flex.flex_attention(q, k, v, score_mod=mod, block_mask=block_mask)
        else:
            out = pt.attention(q, k, v, causal=True, log_gates=leaf)
        (out * weights).sum().backward()
        grads.append(leaf.grad)
    assert _error(grads[0], grads[1]) <= TOL


def test_gate_score_mod_precision_at_32k():
    """At L = 32768 with g ≈ −0.05 (|G| up to 1638, float32 steps 1.2e-4) the bias
    of each pair is the float32 rounding of the exact difference; a single float32
    table of G would be off by up to ~1e-4 absolute (~2e-3 relative to a neighbour)."""
    length = 32768
    rng = np.random.default_rng(0)
    g = -rng.uniform(0.04, 0.06, (1, 1, length))
    exact = np.cumsum(g.astype(np.float32).astype(np.float64), -1)[0, 0]
    mod = pt.gate_score_mod(torch.tensor(g, dtype=torch.float32), length)
    i = torch.tensor(rng.integers(length // 2, length, 4096))
    j = (i - torch.tensor(rng.integers(0, 64, 4096))).clamp(min=0)
    zero = torch.zeros(4096)
    b = h = torch.zeros(4096, dtype=torch.long)
    got = mod(zero, b, h, i, j).double().numpy()
    want = exact[i.numpy()] - exact[j.numpy()]
    nearest = np.abs(g).min()
    assert np.max(np.abs(got - want)) <= 1e-5 * nearest
    naive = exact.astype(np.float32)
    lost = np.max(np.abs((naive[i.numpy()] - naive[j.numpy()]) - want))
    assert lost > 100 * np.max(np.abs(got - want))  # what the hi/lo pair buys


def test_gate_score_mod_checks_like_attention():
    _, _, _, g, g_after = _inputs()
    with pytest.raises(InvalidArgumentError, match="<= 0"):
        pt.gate_score_mod(-g, 24)
    with pytest.raises(InvalidArgumentError, match="log_gates_after"):
        pt.gate_score_mod(g, 24, causal=False)
    with pytest.raises(InvalidArgumentError, match="log_gates_after"):
        pt.gate_score_mod(g, 24, log_gates_after=g_after, causal=True)
    with pytest.raises(InvalidArgumentError, match=r"shape \(B, H, Lk\)"):
        pt.gate_score_mod(g, 24, log_gates_after=g_after[:, :2], causal=False)
    with pytest.raises(InvalidArgumentError, match="q_offset"):
        pt.gate_score_mod(g, 8, q_offset=20)
    with pytest.raises(InvalidArgumentError, match="q_len"):
        pt.gate_score_mod(g)
    with pytest.raises(InvalidTypeError, match="floating"):
        pt.gate_score_mod(torch.zeros(2, 4, 24, dtype=torch.int64), 24)
    with pytest.raises(InvalidTypeError, match=r"\(B, H, Lk\)"):
        pt.gate_score_mod(g[0], 24)
    with pytest.raises(InvalidTypeError, match="bool"):
        pt.gate_score_mod(g, 24, key_mask=torch.ones(2, 24))
