"""An offline word-level tokenizer for tiny local models (tests, the digits benchmark).

The Hub cannot be reached from CI, so tiny models get a tokenizer built here from a word list with the
`tokenizers` library. Words are split on whitespace and punctuation; `<image>`/`<video>` are special tokens.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>")

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


def build_word_tokenizer(words: list[str] | tuple[str, ...], video: bool = True) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` whose vocabulary is the special tokens followed by `words` (deduplicated).

    Ids: `<pad>`=0, `<unk>`=1, `<s>`=2, `</s>`=3, `<image>`=4, `<video>`=5, then `words` in order.
    `video=False` leaves `<video>` out (as the public llava-hf tokenizers do): the words then start at id 5.
    """
    specials = SPECIAL_TOKENS if video else tuple(t for t in SPECIAL_TOKENS if t != "<video>")
    vocab = {tok: i for i, tok in enumerate(specials)}
    for word in words:
        if not isinstance(word, str) or not word or any(ch.isspace() for ch in word):
            raise ValueError(f"words must be non-empty strings without whitespace, got {word!r}")
        vocab.setdefault(word, len(vocab))
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
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
