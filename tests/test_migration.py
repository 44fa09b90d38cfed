"""Equivalence tests behind docs/migration.md: posbias against the libraries users
come from. Each test runs the other library when it is installed (the ``compat``
extra installs them in the ``tests(all)`` session) and is skipped otherwise.

Every test prints the measured max difference that docs/migration.md quotes
(``pytest -s tests/test_migration.py``).
"""

from __future__ import annotations

import numpy as np
import pytest

import posbias

torch = pytest.importorskip("torch")
import posbias.torch as pt  # noqa: E402

H, L, D = 12, 24, 16


def _qkv(batch=2, q_len=L, k_len=L, heads=H, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, D, generator=gen),
        torch.randn(batch, heads, k_len, D, generator=gen),
        torch.randn(batch, heads, k_len, D, generator=gen),
    )


def _softmax_attend(q, k, v, bias, visible):
    """The textbook attention the other libraries run (float32)."""
    scores = q @ k.transpose(-1, -2) * D**-0.5 + bias
    scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    return scores.softmax(-1) @ v


def _report(name, diff):
    print(f"\n[migration] {name}: max |difference| = {diff:.2e}")
    return diff


CAUSAL = torch.ones(L, L, dtype=torch.bool).tril()


# ------------------------------------------------------------- HF BLOOM
def test_bloom_build_alibi_tensor():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    q, k, v = _qkv()
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    alibi = bloom.build_alibi_tensor(mask, H, torch.float32).view(2, H, 1, L)
    visible = CAUSAL & mask.bool()[:, None, None, :]
    theirs = _softmax_attend(q, k, v, alibi, visible)
    ours = pt.attention(q, k, v, "alibi", causal=True, key_mask=mask.bool())
    real = mask.bool()[:, None, :, None]  # compare the rows of real queries
    diff = (theirs - ours).abs().masked_fill(~real, 0).max().item()
    assert _report("BLOOM build_alibi_tensor, causal + left padding", diff) < 1e-5
    # the key-only form is not ALiBi without a causal mask
    spec = posbias.get("alibi", num_heads=H)
    bidirectional = _softmax_attend(q, k, v, alibi[:1], torch.ones(L, L, dtype=torch.bool))
    assert (bidirectional[:1] - pt.attention(q, k, v, spec)[:1]).abs().max() > 1e-2


# ------------------------------------------------------------- HF MPT
@pytest.mark.parametrize("heads", [1, 3, 8, 12, 16, 20, 32])
def test_mpt_slopes_equal_the_paper_rule(heads):
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    alibi = mpt.build_mpt_alibi_tensor(heads, 4, alibi_bias_max=8)  # (H, 1, 4): m·(j - 3)
    theirs = -alibi[:, 0, 2].numpy()  # distance 1
    ours = np.float32(posbias.get("alibi", num_heads=heads, max_bias=8).slopes)
    assert np.array_equal(theirs, ours)


def test_mpt_attention():
    mpt = pytest.importorskip("transformers.models.mpt.modeling_mpt")
    q, k, v = _qkv()
    alibi = mpt.build_mpt_alibi_tensor(H, L, alibi_bias_max=8)[None]  # (1, H, 1, L)
    theirs = _softmax_attend(q, k, v, alibi, CAUSAL)
    ours = pt.attention(q, k, v, "alibi", causal=True)
    diff = (theirs - ours).abs().max().item()
    assert _report("MPT build_mpt_alibi_tensor, causal", diff) < 1e-5


# ------------------------------------------------------------- x-transformers
@pytest.mark.parametrize("q_len", [L, 5])
def test_x_transformers_alibi_positional_bias(q_len):
    xt = pytest.importorskip("x_transformers.x_transformers")
    attend = pytest.importorskip("x_transformers.attend")
    module = xt.AlibiPositionalBias(heads=H)
    theirs_bias = module(q_len, L)  # (H, q_len, L), bottom-right
    ours_bias = posbias.get("alibi", num_heads=H).bias(q_len, L, backend="torch")
    bias_diff = (theirs_bias - ours_bias).abs().max().item()
    assert _report(f"x-transformers AlibiPositionalBias values (Lq={q_len})", bias_diff) == 0
    q, k, v = _qkv(q_len=q_len)
    for causal in (False, True):
        theirs, _ = attend.Attend(causal=causal)(q, k, v, attn_bias=theirs_bias)
        ours = pt.attention(q, k, v, "alibi", causal=causal)
        diff = (theirs - ours).abs().max().item()
        assert _report(f"x-transformers Attend + alibi, causal={causal}", diff) < 1e-5


# ------------------------------------------------------------- keras-hub
def test_keras_hub_alibi_bias():
    keras_hub = pytest.importorskip("keras_hub")
    scores = np.zeros((1, H, L, L), np.float32)
    theirs = np.asarray(keras_hub.layers.AlibiBias()(scores))  # m·(j - (Lk-1)), key-only
    spec = posbias.get("alibi", num_heads=H)
    ours = spec.bias(L, L)
    # equal up to a per-row constant (m·(i - Lk + 1)), which softmax ignores under a
    # causal mask: compare after removing each row's value at the diagonal
    diag = np.arange(L)
    theirs_rel = theirs[0] - theirs[0][:, diag, diag][:, :, None]
    causal = np.tril(np.ones((L, L), bool))
    diff = float(np.abs(np.where(causal, theirs_rel - ours, 0)).max())
    assert _report("keras-hub AlibiBias (causal part, row-shifted)", diff) < 1e-5
    assert np.abs(np.where(~causal, theirs_rel - ours, 0)).max() > 1  # not symmetric


# ------------------------------------------------------------- FlexAttention (attention-gym)
def _attention_gym_alibi_slopes(heads):
    """attention-gym's ``generate_alibi_bias`` (its examples; not on PyPI):
    ``exp2(-(h + 1) * 8 / H)``, the naive geometric rule."""
    return torch.exp2(-((torch.arange(heads) + 1) * 8.0 / heads))


def test_attention_gym_alibi_score_mod():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    slopes = _attention_gym_alibi_slopes(H)

    def alibi_score_mod(score, b, h, q_idx, kv_idx):  # attention-gym's form
        return score + slopes[h] * (kv_idx - q_idx)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    q, k, v = _qkv()
    block_mask = create_block_mask(causal, None, None, L, L, device="cpu")
    theirs = flex_attention(q, k, v, score_mod=alibi_score_mod, block_mask=block_mask)
    geometric = posbias.get("alibi", num_heads=H, schedule="geometric")
    ours = pt.attention(q, k, v, geometric, causal=True)
    diff = (theirs - ours).abs().max().item()
    assert _report("attention-gym ALiBi score_mod vs schedule='geometric'", diff) < 1e-5
    paper = torch.as_tensor(posbias.get("alibi", num_heads=H).slopes, dtype=torch.float32)
    rel = ((slopes - paper).abs() / paper).max().item()
    _report("attention-gym slopes vs paper slopes, 12 heads (relative)", rel)
    assert rel > 0.1
    differ = (theirs - pt.attention(q, k, v, "alibi", causal=True)).abs().max().item()
    _report("attention-gym ALiBi vs posbias paper-rule ALiBi, outputs", differ)
    assert differ > 1e-3


# ------------------------------------------------------------- HF T5
def test_hf_t5_relative_attention_bias_end_to_end():
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    from transformers import T5Config

    config = T5Config(
        num_heads=4,
        d_model=64,
        d_kv=16,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        is_decoder=False,
    )
    layer = t5.T5Attention(config, has_relative_attention_bias=True)
    theirs = layer.compute_bias(L, L)[0]  # (H, L, L), bidirectional encoder
    spec = posbias.get("t5", num_heads=4, num_buckets=32, max_distance=128, bidirectional=True)
    table = layer.relative_attention_bias.weight.detach().numpy()  # (buckets, H)
    ours = spec.bias(L, L, params={"table": table}, backend="torch")
    diff = (theirs - ours).abs().max().item()
    assert _report("HF T5Attention.compute_bias (encoder), same table", diff) == 0
