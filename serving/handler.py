"""`EndpointHandler`: the custom-code entry point of Hugging Face Inference Endpoints for DeFT-LLaVA.

Inference Endpoints loads `handler.py` from the root of a model repository, builds `EndpointHandler(path)` once
and calls it with the decoded JSON body of each request (huggingface-inference-toolkit, "custom handler":
`__init__(self, path)`, `__call__(self, data) -> list[dict]`). `hub_card/export.py` copies this file into every
exported folder next to the model code, so the folder the exporter writes is also a deployable endpoint.

Payload (JSON)::

    {"inputs": {"prompt": "what digit is on the left ?", "images": ["<base64 PNG/JPEG>", ...]},
     "parameters": {"max_new_tokens": 20}}

- `images`: a list (or `image`: one) of base64 strings (a `data:image/...;base64,` prefix and line breaks are
  accepted), raw encoded bytes, or `PIL.Image.Image`. URLs are refused: the endpoint never fetches anything.
  Images reach the processor as decoded (16-bit grey included): the answer equals `generate` on the same file.
- `prompt`: either a full prompt that already holds one `<image>` (the processor's image token) per image,
  used as it is, or plain text, which is wrapped by the folder's chat template as one user turn with the
  images first and the text after them (`"image_position": "after"` puts the text first: use the order the
  checkpoint was trained with; the reply's `image_position` says which order was used).
- `parameters`: keyword arguments for `generate` among `max_new_tokens` (default 20, at most 1024),
  `do_sample`, `temperature`, `top_p`, `top_k`, `num_beams`, `repetition_penalty`.
- A body that is raw image bytes (the toolkit passes `{"inputs": <PIL image>}` for `image/*` requests) is
  accepted with `parameters.prompt` as the text.

Returns `[{"generated_text": str, "num_visual_tokens": int, "num_visual_tokens_per_image": [int, ...],
"num_source_tokens_per_image": [int, ...], "image_position": str}]`: the language model saw `num_visual_tokens`
visual tokens in all (after compression), out of the encoder's `num_source_tokens_per_image`; `image_position`
is where the images went: "before" or "after" the text of a plain-text prompt, "prompt" when the prompt held
its own image tokens. The counts come from one extra
prefill (`model(**inputs).kept_indices`), so they are exact for every method, including those that decide the
count inside the forward pass; it costs one more prefill per request.

Raises:
    TypeError: a payload field has the wrong type (names the field and the type received).
    ValueError: a missing or empty field, an image that does not decode, a URL, a prompt whose `<image>`
        count differs from the number of images, or an unknown or out-of-range generation parameter.

Differences from the toolkit's examples: it returns a list of one dict (the toolkit's convention) and
refuses rather than ignores unknown parameters.
"""

from __future__ import annotations

import base64
import binascii
import io

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

GENERATION_PARAMETERS = {
    "max_new_tokens": int,
    "do_sample": bool,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "num_beams": int,
    "repetition_penalty": float,
}
DEFAULT_MAX_NEW_TOKENS = 20
MAX_NEW_TOKENS_LIMIT = 1024
HANDLER_PARAMETERS = ("prompt", "image_position")


def _decode_image(value, index: int) -> Image.Image:
    """One image of the payload -> `PIL.Image.Image` as decoded, in its own mode. `index`: its place in
    `images` (for messages).

    The processor converts it (to RGB; 16-bit grey scaled to 8 bits first), exactly as `generate` on the
    same file: a `convert("RGB")` here would clip a 16-bit grey PNG before the processor's own scaling."""
    name = f"images[{index}]"
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.lower().startswith(("http://", "https://", "ftp://", "file:")):
            raise ValueError(f"{name} is a URL ({text[:60]!r}): send the image as base64 or bytes")
        if text.startswith("data:"):
            header, _, text = text.partition(",")
            if ";base64" not in header:
                raise ValueError(f"{name} is a data URI without ';base64' ({header[:60]!r})")
        text = "".join(text.split())  # line-wrapped base64 (76-character lines of MIME encoders, CRLF too)
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{name} is not valid base64 ({text[:40]!r}...): {error}") from None
    elif isinstance(value, bytes):
        raw = bytes(value)
    else:
        raise TypeError(f"{name} must be a base64 string, bytes or a PIL image, got {type(value).__name__}")
    if not raw:
        raise ValueError(f"{name} is empty")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except Exception as error:  # PIL raises several types for undecodable data
        raise ValueError(
            f"{name} does not decode as an image ({len(raw)} bytes starting {raw[:8]!r}): {error}"
        ) from None
    return image


def _generation_kwargs(parameters: dict) -> dict:
    """Checked `generate` keyword arguments from the payload's `parameters`."""
    kwargs = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "do_sample": False}
    for key, value in parameters.items():
        if key in HANDLER_PARAMETERS:
            continue
        if key not in GENERATION_PARAMETERS:
            raise ValueError(
                f"unknown parameter {key!r}; valid: {sorted(GENERATION_PARAMETERS) + list(HANDLER_PARAMETERS)}"
            )
        kind = GENERATION_PARAMETERS[key]
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok, value = True, float(value)
        if not ok:
            raise TypeError(f"parameter {key!r} must be {kind.__name__}, got {value!r}")
        kwargs[key] = value
    if not 1 <= kwargs["max_new_tokens"] <= MAX_NEW_TOKENS_LIMIT:
        raise ValueError(
            f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {kwargs['max_new_tokens']}"
        )
    return kwargs


class EndpointHandler:
    """Loads the DeFT-LLaVA folder once; each call answers one prompt about one or more images.

    Args:
        path: the model folder (Inference Endpoints passes the repository's local copy).
    """

    def __init__(self, path: str = ""):
        # the folder's own code (auto_map), audited by the exporter; nothing is downloaded
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
        self.model.eval()
        self.image_token = self.processor.image_token

    def _read_payload(self, data) -> tuple[str, list, dict, str]:
        if not isinstance(data, dict):
            raise TypeError(f"the payload must be a JSON object (dict), got {type(data).__name__}")
        inputs = data.get("inputs", data)
        parameters = data.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise TypeError(f"'parameters' must be an object, got {type(parameters).__name__}")
        if isinstance(inputs, Image.Image | bytes):  # an image/* request body
            inputs = {"images": [inputs], "prompt": parameters.get("prompt")}
        if not isinstance(inputs, dict):
            raise TypeError(
                f"'inputs' must be an object with 'prompt' and 'images', got {type(inputs).__name__}"
            )
        unknown = sorted(set(inputs) - {"prompt", "images", "image"})
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} in 'inputs'; valid: ['image', 'images', 'prompt']")
        if "image" in inputs and "images" in inputs:
            raise ValueError("give either 'image' or 'images' in 'inputs', not both")
        images = inputs.get("images", [inputs["image"]] if "image" in inputs else None)
        if images is None:
            raise ValueError("'inputs' has no 'images' (or 'image'): DeFT-LLaVA needs at least one image")
        if not isinstance(images, list):
            raise TypeError(f"'images' must be a list, got {type(images).__name__}")
        if not images:
            raise ValueError("'images' is empty: DeFT-LLaVA needs at least one image")
        prompt = inputs.get("prompt")
        if not isinstance(prompt, str):
            raise TypeError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("'prompt' is empty")
        position = parameters.get("image_position", "before")
        if position not in ("before", "after"):
            raise ValueError(f"parameter 'image_position' must be 'before' or 'after', got {position!r}")
        return prompt, images, parameters, position

    def _full_prompt(self, prompt: str, num_images: int, position: str) -> tuple[str, str]:
        """The prompt for the processor and where the images went: `position` ("before"/"after" the text) for a
        plain-text prompt, "prompt" for one that holds its own image tokens."""
        count = prompt.count(self.image_token)
        if count == 0:
            content = [{"type": "text", "text": prompt}]
            image_parts = [{"type": "image"}] * num_images
            content = image_parts + content if position == "before" else content + image_parts
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True), position
        if count != num_images:
            raise ValueError(
                f"the prompt holds {count} {self.image_token!r} token(s) but {num_images} image(s) were sent"
            )
        return prompt, "prompt"

    def __call__(self, data: dict) -> list[dict]:
        """Answer one request; see the module docstring for the payload and the result."""
        prompt, raw_images, parameters, position = self._read_payload(data)
        images = [_decode_image(value, i) for i, value in enumerate(raw_images)]
        generation = _generation_kwargs(parameters)
        text, used_position = self._full_prompt(prompt, len(images), position)
        inputs = self.processor(images=images, text=[text], return_tensors="pt")
        with torch.no_grad():
            # the inner model's output carries, besides the kept source indices, each image's encoder token
            # count N (LLaVA-NeXT: base view plus tile grid, different per image size)
            outputs = self.model.model(**inputs)
            generated = self.model.generate(**inputs, **generation)
        kept = outputs.kept_indices  # list, per image, of the kept source indices
        prompt_length = inputs["input_ids"].shape[1]
        answer = self.processor.tokenizer.decode(generated[0, prompt_length:], skip_special_tokens=True)
        per_image = [int(len(k)) for k in kept]
        sources = [int(n) for n in outputs.image_features_output.num_source_tokens]
        return [
            {
                "generated_text": answer.strip(),
                "num_visual_tokens": sum(per_image),
                "num_visual_tokens_per_image": per_image,
                "num_source_tokens_per_image": sources,
                "image_position": used_position,
            }
        ]
