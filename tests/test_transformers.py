"""posbias.transformers: patched Hugging Face models against the models themselves.

Tiny random-config models of each supported architecture (built from their
config classes, nothing downloaded): logits on a left-padded batch, greedy
``generate`` of 16 tokens, a training step's gradients, ``output_attentions``,
``save_pretrained``, and ``attn_implementation="posbias"``. Each test prints
the measured difference (``pytest -s tests/test_transformers.py``), which
docs/transformers.md quotes. Skipped cleanly without transformers or PyTorch.
"""

from __future__ import annotations

import warnings

import pytest

from conftest import BACKENDS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if "torch" not in BACKENDS:
    pytest.skip("torch not under test", allow_module_level=True)

import posbias  # noqa: E402
import posbias.transformers as ptr  # noqa: E402
from posbias.transformers import _common  # noqa: E402

ARCHS = ("bloom", "mpt", "falcon", "t5", "mt5", "umt5")
T5_FAMILY = ("t5", "mt5", "umt5")
TOLERANCE = 1e-4


def _config(arch: str, **overrides):
    if arch == "bloom":
        return transformers.BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)
    if arch == "mpt":
        return transformers.MptConfig(
            vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, **overrides
        )
    if arch == "falcon":  # multi-query: one K/V head for 4 query heads
        settings = {"alibi": True, **overrides}
        return transformers.FalconConfig(
            vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **settings
        )
    config_class = {
        "t5": transformers.T5Config,
        "mt5": transformers.MT5Config,
        "umt5": transformers.UMT5Config,
    }[arch]
    return config_class(
        vocab_size=97,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,  # a 30-token input reaches the log buckets
        relative_attention_max_distance=20,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        **overrides,
    )


def _model_class(arch: str):
    return {
        "bloom": transformers.BloomForCausalLM,
        "mpt": transformers.MptForCausalLM,
        "falcon": transformers.FalconForCausalLM,
        "t5": transformers.T5ForConditionalGeneration,
        "mt5": transformers.MT5ForConditionalGeneration,
        "umt5": transformers.UMT5ForConditionalGeneration,
    }[arch]


def _reference_implementation(arch: str) -> str:
    # Falcon's own default is SDPA; its eager ALiBi path adds the bias twice
    # (test_falcon_eager_adds_the_alibi_bias_twice)
    return "sdpa" if arch == "falcon" else "eager"


def _build(arch: str, implementation: str | None = None, **overrides):
    torch.manual_seed(0)
    implementation = implementation or _reference_implementation(arch)
    config = _config(arch, **overrides)
    return _model_class(arch)._from_config(config, attn_implementation=implementation).eval()


def _pair(arch: str, **overrides):
    """(the model, a patched copy with the same weights)."""
    return _build(arch, **overrides), ptr.patch(_build(arch, "eager", **overrides))


def _batch(arch: str) -> tuple[dict, torch.Tensor]:
    """Forward arguments of a left-padded batch and the mask of the positions to compare."""
    gen = torch.Generator().manual_seed(1)
    length = 30 if arch in T5_FAMILY else 12
    ids = torch.randint(3, 97, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :5] = 0
    ids[1, :5] = 0
    if arch in T5_FAMILY:
        decoder = torch.randint(3, 97, (2, 25), generator=gen)
        return (
            {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder},
            torch.ones(2, 25, dtype=torch.bool),
        )
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def _report(name: str, value: float) -> float:
    print(f"\n[transformers] {name}: {value:.2e}")
    return value


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_the_model_on_a_left_padded_batch(arch):
    model, patched = _pair(arch)
    kwargs, real = _batch(arch)
    with torch.no_grad():
        theirs, ours = model(**kwargs).logits, patched(**kwargs).logits
    diff = (theirs - ours).abs()[real].max().item()
    assert _report(f"{arch} logits, left-padded batch, max |diff|", diff) <= TOLERANCE
    assert patched.config._attn_implementation == "posbias"


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generate_is_identical(arch):
    model, patched = _pair(arch)
    kwargs, _ = _batch(arch)
    kwargs.pop("decoder_input_ids", None)
    settings = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    theirs = model.generate(**kwargs, **settings)
    ours = patched.generate(**kwargs, **settings)
    assert ours.shape[-1] - (0 if arch in T5_FAMILY else kwargs["input_ids"].shape[-1]) >= 16
    assert torch.equal(theirs, ours)


def _labels(kwargs: dict, arch: str) -> torch.Tensor:
    if arch in T5_FAMILY:
        return kwargs["decoder_input_ids"]
    # the first real token of a left-padded row is predicted from a padding position, a
    # query that sees no key: HF averages over masked keys there, posbias outputs 0 (not
    # a prediction either side should train on), so it is no label, like the padding
    mask = kwargs["attention_mask"]
    ignored = (mask == 0) | (torch.nn.functional.pad(mask, (1, 0))[:, :-1] == 0)
    ignored[:, 0] = mask[:, 0] == 0
    return kwargs["input_ids"].masked_fill(ignored, -100)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_training_step_gives_the_same_gradients(arch):
    model, patched = _pair(arch)
    kwargs, _ = _batch(arch)
    worst = 0.0
    grads = []
    for m in (model, patched):
        m.train()
        m.zero_grad()
        m(**kwargs, labels=_labels(kwargs, arch)).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        worst = max(worst, (grad - grads[1][name]).abs().max().item())
    assert _report(f"{arch} training step, max |grad diff|", worst) <= TOLERANCE
    if arch in T5_FAMILY:  # the relative_attention_bias table trains through posbias
        table = next(n for n in grads[1] if "relative_attention_bias" in n)
        assert grads[1][table].abs().max() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_output_attentions_falls_back_to_the_exact_path_and_says_so(arch, monkeypatch):
    monkeypatch.setattr(_common, "_WARNED", set())
    reference = _build(arch, "eager")
    _, patched = _pair(arch)
    kwargs, _ = _batch(arch)
    with torch.no_grad(), pytest.warns(UserWarning, match="materialised path"):
        ours = patched(**kwargs, output_attentions=True)
    with torch.no_grad():
        fast = patched(**kwargs).logits
        theirs = reference(**kwargs, output_attentions=True)
    torch.testing.assert_close(ours.logits, fast, rtol=0, atol=1e-5)
    names = ["encoder_attentions", "decoder_attentions"] if arch in T5_FAMILY else ["attentions"]
    rows = kwargs["attention_mask"].bool()  # real query rows of the (padded) self-attention
    for name in names:
        for a, b in zip(getattr(ours, name), getattr(theirs, name), strict=True):
            assert a.shape == b.shape
            if name == "decoder_attentions":
                pick = slice(None)  # the decoder input is not padded
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
                continue
            for batch in range(2):
                pick = rows[batch]
                if arch == "falcon":  # HF's eager Falcon adds the bias twice: sums only
                    torch.testing.assert_close(
                        a[batch][:, pick].sum(-1), torch.ones_like(a[batch][:, pick].sum(-1))
                    )
                else:
                    torch.testing.assert_close(
                        a[batch][:, pick], b[batch][:, pick], rtol=0, atol=1e-5
                    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        with torch.no_grad():
            patched(**kwargs, output_attentions=True)


@pytest.mark.parametrize("arch", ["bloom", "t5"])
def test_save_pretrained_writes_the_unchanged_model(arch, tmp_path):
    model, patched = _pair(arch)
    patched.save_pretrained(tmp_path)
    assert "posbias" not in (tmp_path / "config.json").read_text()
    assert set(patched.state_dict()) == set(model.state_dict())
    reloaded = _model_class(arch).from_pretrained(tmp_path, attn_implementation="eager").eval()
    kwargs, real = _batch(arch)
    with torch.no_grad():
        expected = patched(**kwargs).logits
        assert (reloaded(**kwargs).logits - expected).abs()[real].max() <= TOLERANCE
        torch.testing.assert_close(ptr.patch(reloaded)(**kwargs).logits, expected)


@pytest.mark.parametrize("arch", T5_FAMILY)
def test_attn_implementation_posbias(arch):
    ptr.register()
    model = _build(arch)
    registered = _build(arch, "posbias")
    assert registered.config._attn_implementation == "posbias"
    kwargs, _ = _batch(arch)
    with torch.no_grad():
        diff = (model(**kwargs).logits - registered(**kwargs).logits).abs().max().item()
    assert _report(f"{arch} attn_implementation='posbias', max |diff|", diff) <= TOLERANCE
    switched = _build(arch)
    switched.set_attn_implementation("posbias")
    with torch.no_grad():
        torch.testing.assert_close(switched(**kwargs).logits, registered(**kwargs).logits)
    for m in (model, registered):  # gradients reach the table through HF's bias tensor
        m.train()
        m(**kwargs, labels=_labels(kwargs, arch)).loss.backward()
    for name, param in model.named_parameters():
        other = registered.get_parameter(name).grad
        assert (param.grad - other).abs().max() <= TOLERANCE, name


@pytest.mark.parametrize("arch", T5_FAMILY)
def test_patched_t5_builds_no_position_bias_tensor(arch, monkeypatch):
    _, patched = _pair(arch)
    attention = type(patched.encoder.block[0].layer[0].SelfAttention)

    def forbidden(*args, **kwargs):
        raise AssertionError("compute_bias materialised the (1, H, Lq, Lk) bias")

    monkeypatch.setattr(attention, "compute_bias", forbidden)
    kwargs, _ = _batch(arch)
    with torch.no_grad():
        patched(**kwargs)
    real_zeros = torch.zeros

    def no_bias_sized_zeros(*shape, **kw):
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        assert len(dims) != 4 or dims[0] != 1, f"a (1, H, Lq, Lk) zero bias {dims} was built"
        return real_zeros(*shape, **kw)

    monkeypatch.setattr(torch, "zeros", no_bias_sized_zeros)
    with torch.no_grad():
        patched(**kwargs)


def test_falcon_eager_adds_the_alibi_bias_twice():
    """Found while testing: transformers 5.24's eager Falcon-ALiBi path adds alibi/√d in the
    scores and again in the mask; its SDPA path (Falcon's default) adds it once. posbias
    with doubled slopes reproduces eager; the patched model follows SDPA."""
    eager, patched = _build("falcon", "eager"), ptr.patch(_build("falcon", "eager"))
    for module in patched.modules():
        if hasattr(module, "_posbias"):
            info = module._posbias
            doubled = posbias.get(
                "alibi", num_heads=4, custom_slopes=tuple(2 * s for s in info.spec.slopes)
            )
            module._posbias = type(info)(doubled, info.scale)
    kwargs, real = _batch("falcon")
    with torch.no_grad():
        diff = (eager(**kwargs).logits - patched(**kwargs).logits).abs()[real].max().item()
    assert _report("falcon eager vs posbias with the bias twice", diff) <= TOLERANCE


# --------------------------------------------------------------- bad input
def test_patch_rejects_what_it_does_not_support():
    with pytest.raises(posbias.InvalidTypeError, match="PreTrainedModel"):
        ptr.patch(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=11, n_embd=8, n_layer=1, n_head=2)
    )
    with pytest.raises(posbias.InvalidArgumentError, match="supports bloom, mpt, falcon"):
        ptr.patch(gpt2)
    with pytest.raises(posbias.InvalidArgumentError, match="rotary"):
        ptr.patch(_build("falcon", alibi=False))


def test_attn_implementation_posbias_refuses_other_models():
    ptr.register()
    config = transformers.LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="posbias")
    with pytest.raises(posbias.InvalidArgumentError, match="T5 family"):
        model(torch.tensor([[1, 2, 3]]))


def test_training_with_attention_dropout_is_refused():
    patched = ptr.patch(_build("bloom", "eager"))
    patched.config.attention_dropout = 0.1
    for module in patched.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout.p = 0.1
    kwargs, _ = _batch("bloom")
    patched.train()
    with pytest.raises(posbias.InvalidArgumentError, match="dropout"):
        patched(**kwargs)
    patched.eval()
    patched(**kwargs)  # no dropout in eval mode


def test_static_cache_and_4d_masks_are_refused():
    patched = ptr.patch(_build("bloom", "eager"))
    kwargs, _ = _batch("bloom")
    with pytest.raises(posbias.InvalidArgumentError, match="DynamicCache"):
        patched.generate(**kwargs, max_new_tokens=2, cache_implementation="static", pad_token_id=0)
    mpt = ptr.patch(_build("mpt", "eager"))  # (BLOOM itself takes no 4-D mask)
    mask4d = torch.ones(2, 1, 12, 12, dtype=torch.bool).tril()
    with pytest.raises(posbias.InvalidArgumentError, match="4-D"):
        mpt(kwargs["input_ids"], attention_mask=mask4d)


def test_models_sharing_the_config_object_keep_their_attention():
    config = _config("t5")
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    other = transformers.T5ForConditionalGeneration(config).eval()
    other.load_state_dict(model.state_dict())
    ptr.patch(model)
    assert other.config is config and config._attn_implementation != "posbias"
    assert model.config is not config and model.config._attn_implementation == "posbias"
    kwargs, _ = _batch("t5")
    with torch.no_grad():
        diff = (model(**kwargs).logits - other(**kwargs).logits).abs().max()
    assert diff <= TOLERANCE
    assert ptr.patch(model) is model  # patching twice is harmless


def test_the_posbias_mask_function_reads_padding_patterns_only():
    from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    built = _common.posbias_mask(2, 3, 3, mask_function=causal_mask_function, attention_mask=mask)
    assert torch.equal(built, mask.bool())
    none_padded = _common.posbias_mask(2, 3, 3, mask_function=causal_mask_function)
    assert none_padded.shape == (2, 0)
    with pytest.raises(posbias.InvalidArgumentError, match="sliding windows"):
        _common.posbias_mask(2, 3, 3, mask_function=sliding_window_causal_mask_function(2))
    with pytest.raises(posbias.InvalidArgumentError, match="DynamicCache"):
        _common.posbias_mask(2, 1, 8, q_offset=3, mask_function=causal_mask_function)
    with pytest.raises(posbias.InvalidArgumentError, match="one entry per key"):
        _common.posbias_mask(2, 3, 3, mask_function=causal_mask_function, attention_mask=mask[:1])
