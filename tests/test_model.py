"""Tiny masked-diffusion model and char tokenizer: bidirectionality, padding, RoPE, HF round trips."""

import warnings

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedTokenizerFast

from dllm_rl.models.char_tokenizer import SPECIAL_TOKENS, build_char_tokenizer
from dllm_rl.models.tiny import TinyMDLM, TinyMDLMConfig, position_ids_from_attention_mask

ALPHABET = "0123456789"


@pytest.fixture
def tok() -> PreTrainedTokenizerFast:
    return build_char_tokenizer(ALPHABET)


def make_model(tok: PreTrainedTokenizerFast, seed: int = 0, **overrides) -> TinyMDLM:
    torch.manual_seed(seed)
    config = TinyMDLMConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        mask_token_id=tok.mask_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **overrides,
    )
    model = TinyMDLM(config)
    # Default init gives near-uniform logits, which makes "logits changed" tests weak; scale the weights
    # up so every position has a strong, input-dependent output.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model.eval()


def random_ids(tok: PreTrainedTokenizerFast, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), len(tok), (batch, length), generator=g)


# --------------------------------------------------------------------------------------------- model


def test_config_defaults():
    config = TinyMDLMConfig(vocab_size=16, mask_token_id=3)
    assert (config.hidden_size, config.num_layers, config.num_heads) == (64, 4, 4)
    assert config.intermediate_size == 176
    assert config.intermediate_size % 8 == 0
    assert config.num_hidden_layers == 4 and config.num_attention_heads == 4  # standard-name aliases
    assert config.mask_token_id == 3 and config.tie_word_embeddings is False
    with pytest.raises(Exception, match="divisible"):
        TinyMDLMConfig(vocab_size=16, hidden_size=66, num_heads=4)


def test_logits_shape_and_bidirectional(tok):
    model = make_model(tok)
    ids = random_ids(tok, 2, 9)
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 9, len(tok))
    changed = ids.clone()
    changed[:, -1] = torch.where(ids[:, -1] == 5, 6, 5)
    with torch.no_grad():
        logits2 = model(changed).logits
    # A causal model could never let the last token influence the first position.
    assert (logits2[:, 0] - logits[:, 0]).abs().max() > 1e-3


def test_left_padding_matches_unpadded(tok):
    model = make_model(tok)
    lengths = [7, 4, 1]
    T = max(lengths)
    seqs = [random_ids(tok, 1, n, seed=n)[0] for n in lengths]
    ids = torch.full((len(seqs), T), tok.pad_token_id)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, T - len(s) :] = s
        mask[b, T - len(s) :] = 1
    # An all-padding row must not produce NaN either.
    ids = torch.cat([ids, torch.full((1, T), tok.pad_token_id)])
    mask = torch.cat([mask, torch.zeros(1, T, dtype=torch.long)])

    pos = position_ids_from_attention_mask(mask)
    assert pos[0].tolist() == list(range(T)) and pos[1].tolist() == [0, 0, 0, 0, 1, 2, 3]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, position_ids=pos).logits
        assert not torch.isnan(batched).any()
        for b, s in enumerate(seqs):
            alone = model(s[None]).logits[0]
            torch.testing.assert_close(batched[b, T - len(s) :], alone, atol=1e-5, rtol=0)


def test_padding_keys_are_ignored(tok):
    # Whatever sits at padded positions must not leak into real positions.
    model = make_model(tok)
    ids = random_ids(tok, 1, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    other = ids.clone()
    other[0, :2] = torch.tensor([7, 8])
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits[0, 2:]
        b = model(other, attention_mask=mask).logits[0, 2:]
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_rotary_breaks_permutation_invariance(tok):
    model = make_model(tok)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    swapped = ids[:, [1, 0, 2, 3, 4, 5]]
    with torch.no_grad():
        logits = model(ids).logits
        logits_swapped = model(swapped).logits
    # Without positional information the outputs would just swap along with the inputs.
    assert (logits_swapped[:, [1, 0, 2, 3, 4, 5]] - logits).abs().max() > 1e-3
    # Unchanged tokens at unchanged positions see a different context order, too.
    assert (logits_swapped[:, 2:] - logits[:, 2:]).abs().max() > 1e-3


def test_position_ids_default_is_arange(tok):
    model = make_model(tok)
    ids = random_ids(tok, 2, 5)
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, position_ids=torch.arange(5).expand(2, 5)).logits
        c = model(ids, position_ids=torch.arange(5).expand(2, 5) + 3).logits
    torch.testing.assert_close(a, b)
    # A constant shift is almost invisible to RoPE (only relative offsets matter), but not exactly.
    torch.testing.assert_close(a, c, atol=1e-3, rtol=1e-3)


def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_model(tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, TinyMDLM)
    for key in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id", "vocab_size"):
        assert getattr(loaded.config, key) == getattr(model.config, key)
    assert loaded.config.mask_token_id == tok.mask_token_id

    texts = ["0123", "98", "5"]
    enc = tok(texts, padding=True, return_tensors="pt")
    loaded_enc = loaded_tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, loaded_enc.input_ids)
    assert torch.equal(enc.attention_mask, loaded_enc.attention_mask)
    assert loaded_tok.decode(enc.input_ids[0], skip_special_tokens=True) == "0123"
    assert loaded_tok.padding_side == "left" and loaded_tok.mask_token_id == tok.mask_token_id

    pos = position_ids_from_attention_mask(enc.attention_mask)
    with torch.no_grad():
        expected = model(enc.input_ids, attention_mask=enc.attention_mask, position_ids=pos).logits
        got = loaded(enc.input_ids, attention_mask=enc.attention_mask, position_ids=pos).logits
    assert torch.equal(expected, got)


def test_tied_embeddings_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_model(tok, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = TinyMDLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_gradient_checkpointing_same_grads(tok):
    ids = random_ids(tok, 2, 8)
    mask = torch.tensor([[1] * 8, [0, 0, 0] + [1] * 5])
    pos = position_ids_from_attention_mask(mask)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model(tok, seed=3).train()
        if checkpointing:
            with warnings.catch_warnings():
                # transformers 5.23 deprecates the name in favour of activation_checkpointing_enable.
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        logits = model(ids, attention_mask=mask, position_ids=pos).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none")
        (loss * mask.flatten()).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert plain[name].abs().sum() > 0, name
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocab_layout(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == len(SPECIAL_TOKENS) + len(ALPHABET)
    assert SPECIAL_TOKENS == ("<pad>", "<bos>", "<eos>", "<mask>", "<unk>")
    special_ids = (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id, tok.unk_token_id)
    assert special_ids == (0, 1, 2, 3, 4)
    assert tok.convert_tokens_to_ids(list(ALPHABET)) == list(range(5, 15))
    # Duplicates are dropped, first occurrence keeps its place.
    assert len(build_char_tokenizer("abca")) == len(SPECIAL_TOKENS) + 3


def test_tokenizer_round_trip_and_bos(tok):
    s = "9081726354"
    ids = tok(s, add_special_tokens=False).input_ids
    assert ids == [5 + int(c) for c in s]
    assert tok.decode(ids) == s
    with_bos = tok(s).input_ids
    assert with_bos == [tok.bos_token_id] + ids
    assert tok.decode(with_bos, skip_special_tokens=True) == s
    specials = [tok.mask_token_id, *ids, tok.eos_token_id, tok.pad_token_id]
    assert tok.decode(specials, skip_special_tokens=True) == s


def test_tokenizer_whitespace_and_unknown():
    t = build_char_tokenizer("ab \n")
    s = "a b\n\nba "
    assert t.decode(t(s, add_special_tokens=False).input_ids) == s
    assert len(t(s, add_special_tokens=False).input_ids) == len(s)
    ids = t("axb", add_special_tokens=False).input_ids
    assert ids == [t.convert_tokens_to_ids("a"), t.unk_token_id, t.convert_tokens_to_ids("b")]


def test_tokenizer_left_padding(tok):
    enc = tok(["12345", "67"], padding=True)
    assert tok.padding_side == "left"
    assert enc.attention_mask == [[1] * 6, [0, 0, 0, 1, 1, 1]]
    assert enc.input_ids[1][:3] == [tok.pad_token_id] * 3
    assert enc.input_ids[1][3] == tok.bos_token_id
