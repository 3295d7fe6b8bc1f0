"""Checks of a forward's inputs: a user's mistake (labels of another length, a mask that does not fit the tokens,
token ids outside the vocabulary, no tokens at all, one-channel pixels) is a `ValueError`/`TypeError` that names
the value and what is valid, raised before any of it reaches torch or the language model (whose errors name
neither: "Expected input batch_size (26) to match target batch_size (23)", "index out of range in self",
"cannot reshape tensor of 0 elements").

The checks read the tensors' values on the host (a min/max per call); while `torch.compile` traces they are
skipped, as the model's other host-side checks are.
"""

from __future__ import annotations

import torch


def _shape(value) -> tuple:
    return tuple(value.shape)


def check_token_inputs(
    input_ids,
    inputs_embeds,
    attention_mask,
    cached_tokens: int,
    vocab_size: int | None,
    extra_ids: tuple = (),
):
    """`input_ids` (or `inputs_embeds`) and the 2-D padding mask of one forward.

    Args:
        cached_tokens: tokens the cache already holds (0 for a prefill): the mask then covers them too.
        vocab_size: rows of the input embedding; ids must lie in `[0, vocab_size)` (None: not checked).
        extra_ids: ids outside the vocabulary that the model takes anyway (the context markers).

    Raises:
        TypeError: `input_ids` of a floating or bool dtype.
        ValueError: no tokens; an id outside the vocabulary; a 2-D mask whose shape does not fit the tokens.
    """
    if torch.compiler.is_compiling():
        return
    tokens = input_ids if input_ids is not None else inputs_embeds
    if not isinstance(tokens, torch.Tensor):
        return
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    if tokens.dim() < 2 or tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(
            f"{name} of shape {_shape(tokens)} holds no tokens: give a (batch_size, sequence_length) batch of at "
            "least one token per row (the processor writes it: processor(images=..., text=...))"
        )
    if input_ids is not None:
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(
                f"input_ids must hold integer token ids (torch.long), got dtype {input_ids.dtype}"
            )
        if vocab_size is not None:
            outside = (input_ids < 0) | (input_ids >= vocab_size)
            for extra in extra_ids:
                outside &= input_ids != extra
            if bool(outside.any()):
                values = sorted({int(v) for v in input_ids[outside].tolist()})[:5]
                raise ValueError(
                    f"input_ids hold token ids {values} outside the vocabulary: valid ids are 0..{vocab_size - 1} "
                    f"(the input embedding has {vocab_size} rows){' and ' + str(list(extra_ids)) if extra_ids else ''}"
                    "; were the ids written by another tokenizer? "
                    "Use this model's processor, or resize the embeddings after adding tokens "
                    "(model.resize_token_embeddings(len(tokenizer)))"
                )
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        return  # no mask, or a 4-D one (the language model checks it)
    batch, length = tokens.shape[:2]
    expected = cached_tokens + length
    if attention_mask.shape[0] != batch or (
        attention_mask.shape[1] != expected if not cached_tokens else attention_mask.shape[1] < length
    ):
        cache_words = f" plus the {cached_tokens} cached tokens" if cached_tokens else ""
        raise ValueError(
            f"attention_mask of shape {_shape(attention_mask)} does not fit {name} of shape {_shape(tokens)}: it "
            f"needs one row per sample and one column per token{cache_words}, shape ({batch}, {expected}); pass "
            "the mask the processor or tokenizer wrote with these ids"
        )


def check_labels(labels, input_ids, inputs_embeds, vocab_size: int | None, ignore_index: int = -100):
    """`labels`: the shape of `input_ids` (`(batch, sequence)`), ids in the vocabulary or `ignore_index`.

    Raises:
        TypeError: labels that are not an integer tensor.
        ValueError: another shape, or a label outside `[0, vocab_size)` other than `ignore_index`.
    """
    if labels is None or torch.compiler.is_compiling():
        return
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(
            "labels must be an integer tensor (torch.long) of token ids, -100 for tokens without loss; got "
            + (f"dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__)
        )
    tokens = input_ids if input_ids is not None else inputs_embeds
    if isinstance(tokens, torch.Tensor) and _shape(labels) != _shape(tokens)[:2]:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(
            f"labels of shape {_shape(labels)} must have the shape of the tokens, {_shape(tokens)[:2]} ({name}): "
            f"one label per token, {ignore_index} where no loss is wanted (the prompt, padding; the model shifts "
            "the labels itself)"
        )
    if vocab_size is not None:
        outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
        if bool(outside.any()):
            values = sorted({int(v) for v in labels[outside].tolist()})[:5]
            raise ValueError(
                f"labels hold {values}: valid labels are token ids 0..{vocab_size - 1} and {ignore_index} "
                "(no loss)"
            )


def check_pixel_values(name: str, pixel_values, num_channels: int, layout: str) -> None:
    """`pixel_values`/`pixel_values_videos`: a tensor whose third dimension from the end holds `num_channels`.

    Args:
        layout: the expected layout, for the message, e.g. "(num_images, channels, height, width)".

    Raises:
        TypeError: not a tensor.
        ValueError: fewer than 3 dimensions, or another number of channels (a grey image: convert it to RGB).
    """
    if pixel_values is None or torch.compiler.is_compiling():
        return
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor {layout}, got {type(pixel_values).__name__}; the processor writes it "
            "(processor(images=..., text=..., return_tensors='pt'))"
        )
    if pixel_values.dim() < 3 or pixel_values.shape[-3] != num_channels:
        raise ValueError(
            f"{name} of shape {_shape(pixel_values)}: the vision tower takes {layout} with {num_channels} "
            "channels; a grey or RGBA image must be converted first (image.convert('RGB'), which the processor "
            "does)"
        )


__all__ = ["check_labels", "check_pixel_values", "check_token_inputs"]
