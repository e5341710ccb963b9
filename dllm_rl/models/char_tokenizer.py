"""Character-level tokenizer for the tiny models and synthetic tasks.

One token per character keeps toy tasks (digit arithmetic, sorting, ...) free of BPE artefacts, so the
model's difficulty is the task itself. It is a real `PreTrainedTokenizerFast` so the rest of the code can
treat it exactly like the tokenizer of a pretrained LLaDA-style model.
"""

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Specials:
    """The special-token strings of one model family, so a tiny tokenizer can mimic a real one.

    The tiny LLaDA and Dream models use their family's names (``<|mdm_mask|>``, ``<|eot_id|>``, ...), so
    chat templates and EOS handling run exactly as with the 8B tokenizers. pad may equal eos (both
    families pad with their end-of-text token).
    """

    pad: str = PAD
    bos: str = BOS
    eos: str = EOS
    mask: str = MASK
    unk: str = UNK
    extra: tuple[str, ...] = ()  # further atomic specials the chat template writes (headers, turn ends)
    chat_template: str = field(default=CHAT_TEMPLATE, repr=False)

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.pad, self.bos, self.eos, self.mask, self.unk, *self.extra)))


def build_char_tokenizer(alphabet: str, specials: Specials | None = None) -> PreTrainedTokenizerFast:
    """Build a char-level tokenizer: the special tokens first (ids 0..4 with the defaults, SPECIAL_TOKENS),
    then the alphabet's characters in order."""
    specials = specials or Specials()
    chars = list(dict.fromkeys(alphabet))  # dedupe, keep first-seen order
    if not chars:
        raise ValueError("alphabet must contain at least one character")
    vocab = {tok: i for i, tok in enumerate(specials.tokens)}
    for ch in chars:
        if ch in vocab:
            raise ValueError(f"alphabet character {ch!r} collides with a special token")
        vocab[ch] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.unk))
    # [\s\S] rather than "." so newlines are split into tokens too (no dot-all flag needed).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.add_special_tokens(list(specials.tokens))
    # Only <bos>: an <eos> would sit right after the prompt and tell the model the answer is over.
    bos = specials.bos
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B:1", special_tokens=[(bos, vocab[bos])]
    )
    # Fuse joins tokens with no separator, so decode(encode(s)) == s (spaces are ordinary characters here).
    tok.decoder = decoders.Fuse()

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=specials.pad,
        bos_token=bos,
        eos_token=specials.eos,
        mask_token=specials.mask,
        unk_token=specials.unk,
        # Prompts are batched left-padded so that every completion starts at the same column.
        padding_side="left",
        # The default clean-up would delete spaces before punctuation, breaking the round trip.
        clean_up_tokenization_spaces=False,
        chat_template=specials.chat_template,
        # No add_bos_token=True: transformers 5 drops it on save, so the post-processor above (stored in
        # tokenizer.json) is the single source of truth and `tok.add_bos_token` reads False.
    )
