"""ToyTransformer: shapes, causality, weight tying, meta-device construction, presets."""

import pytest
import torch

from lab import ModelConfig, ToyTransformer, count_parameters, default_device, get_preset
from lab.model import lm_loss


def test_forward_shape_and_finite_logits():
    torch.manual_seed(0)
    config = get_preset("tiny")
    model = ToyTransformer(config)
    idx = torch.randint(config.vocab_size, (3, 7))
    logits = model(idx)
    assert logits.shape == (3, 7, config.vocab_size)
    assert torch.isfinite(logits).all()


def test_attention_is_causal():
    torch.manual_seed(0)
    config = get_preset("tiny")
    model = ToyTransformer(config).eval()
    idx = torch.randint(config.vocab_size, (2, 10))
    changed = idx.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % config.vocab_size  # alter only the future
    torch.testing.assert_close(model(idx)[:, :6], model(changed)[:, :6])
    assert not torch.allclose(model(idx)[:, 6:], model(changed)[:, 6:])


def test_head_is_tied_to_token_embedding_and_counted_once():
    model = ToyTransformer(get_preset("tiny"))
    assert model.head.weight is model.tok_emb.weight
    unique = {id(p): p.numel() for p in model.parameters()}
    assert count_parameters(model).total == sum(unique.values())


def test_projection_names_match_the_ecosystem():
    model = ToyTransformer(get_preset("tiny"))
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"} <= leaves


def test_gpt2_small_and_gpt3_counted_on_meta_device_without_memory():
    with torch.device("meta"):
        gpt2 = ToyTransformer(get_preset("gpt2-small"))
        gpt3 = ToyTransformer(get_preset("gpt3-175b"))
    assert gpt3.tok_emb.weight.is_meta
    d, L, V, T = 768, 12, 50257, 1024
    per_layer = 12 * d * d + 4 * d  # q,k,v,o + up/down (4d) + two LayerNorms
    assert count_parameters(gpt2).total == L * per_layer + V * d + T * d + 2 * d
    assert 174e9 < count_parameters(gpt3).total < 176e9


def test_sequence_longer_than_max_seq_len_is_refused():
    config = get_preset("tiny", max_seq_len=8)
    model = ToyTransformer(config)
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_seq_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("d_model", 30, "not divisible by n_heads"),
        ("n_layers", 0, "positive int"),
        ("dropout", 1.0, r"\[0, 1\)"),
    ],
)
def test_bad_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value, "n_heads": 4})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="gpt3-175b"):
        get_preset("gpt4")


def test_lm_loss_ignores_masked_positions():
    logits = torch.randn(2, 4, 10)
    targets = torch.tensor([[1, -100, 3, -100], [-100, -100, 5, 6]])
    kept = targets != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(lm_loss(logits, targets), expected)


def test_default_device_is_available():
    device = default_device()
    torch.zeros(1, device=device)  # allocatable there
    if not torch.cuda.is_available():
        assert device.type in ("cpu", "mps")


@pytest.mark.parametrize(
    ("kwargs", "words"), [({"dropout": "0.1"}, "dropout"), ({"bias": "no"}, "bias")]
)
def test_model_config_bad_types(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("idx", [torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), [[1, 2]]])
def test_forward_bad_idx(idx):
    model = ToyTransformer(get_preset("tiny"))
    with pytest.raises(TypeError, match="integer token ids"):
        model(idx)


def test_toy_transformer_bad_config():
    with pytest.raises(TypeError, match="ModelConfig"):
        ToyTransformer({"d_model": 8})
