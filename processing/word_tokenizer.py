"""An offline word-level tokenizer for tiny local models (tests, the digits benchmark).

The Hub cannot be reached from CI, so tiny models get a tokenizer built here from a word list with the
`tokenizers` library. Words are split on whitespace and punctuation; `<image>`/`<video>` are special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>")
CONTEXT_TOKENS = (
    "<context>",
    "</context>",
)  # the markers of a text context (`build_word_tokenizer(context=True)`)

# a minimal LLaVA-1.5 style template: "USER: <image>\nquestion ASSISTANT: answer</s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    " {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}{% endfor %}{% endif %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_word_tokenizer(
    words: list[str] | tuple[str, ...], video: bool = True, context: bool = False
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` whose vocabulary is the special tokens followed by `words` (deduplicated).

    Ids: `<pad>`=0, `<unk>`=1, `<s>`=2, `</s>`=3, `<image>`=4, `<video>`=5, then `words` in order.
    `video=False` leaves `<video>` out (as the public llava-hf tokenizers do): the words then start at id 5.
    `context=True` adds the special tokens `<context>` and `</context>` after the words (the markers of a text
    context, `text_context.py`), so every other id stays the same.
    """
    specials = SPECIAL_TOKENS if video else tuple(t for t in SPECIAL_TOKENS if t != "<video>")
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"words must be non-empty strings without whitespace, got {word!r}")
        vocab.setdefault(word, len(vocab))
    markers = CONTEXT_TOKENS if context else ()
    for marker in markers:
        vocab.setdefault(marker, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>", **({"video_token": "<video>"} if video else {})},
        padding_side="left",
    )
    if markers:  # already in the vocabulary: this only makes the tokenizer split them out as whole tokens
        tokenizer.add_tokens(list(markers), special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
