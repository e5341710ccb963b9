"""Character-level tokenizer for the tiny models and synthetic tasks.

One token per character keeps toy tasks (digit arithmetic, sorting, ...) free of BPE artefacts, so the
model's difficulty is the task itself. It is a real `PreTrainedTokenizerFast` so the rest of the code can
treat it exactly like the tokenizer of a pretrained LLaDA-style model.
"""

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, MASK, UNK = "<pad>", "<bos>", "<eos>", "<mask>", "<unk>"
# A plain chat template, so that tasks in the chat style (user message -> template -> generation
# prompt) run on the tiny models too; instruct checkpoints bring their own.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] | trim) + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Specials come first so their ids (0..4) do not depend on the alphabet.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, MASK, UNK)


def build_char_tokenizer(alphabet: str) -> PreTrainedTokenizerFast:
    """Build a char-level tokenizer: ids 0..4 are SPECIAL_TOKENS, then the alphabet's characters in order."""
    chars = list(dict.fromkeys(alphabet))  # dedupe, keep first-seen order
    if not chars:
        raise ValueError("alphabet must contain at least one character")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if ch in vocab:
            raise ValueError(f"alphabet character {ch!r} collides with a special token")
        vocab[ch] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # [\s\S] rather than "." so newlines are split into tokens too (no dot-all flag needed).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    # Only <bos>: an <eos> would sit right after the prompt and tell the model the answer is over.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    # Fuse joins tokens with no separator, so decode(encode(s)) == s (spaces are ordinary characters here).
    tok.decoder = decoders.Fuse()

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        mask_token=MASK,
        unk_token=UNK,
        # Prompts are batched left-padded so that every completion starts at the same column.
        padding_side="left",
        # The default clean-up would delete spaces before punctuation, breaking the round trip.
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
        # No add_bos_token=True: transformers 5 drops it on save, so the post-processor above (stored in
        # tokenizer.json) is the single source of truth and `tok.add_bos_token` reads False.
    )
