"""DeFT-LLaVA: `LlavaForConditionalGeneration` with token compression inside the forward pass.

The pipeline, for every method (`config.compression_method`, built from `compressors/compression_registry.py`):

1. encode: the vision tower and projector run (`get_image_features` / `get_video_features`); the method may run
   the encoder itself (`encode_images`) or compress the features before the projector
   (`compress_vision_features`), then compresses the projected features (`compress_features`);
2. place: once the prompt is known the method may compress again (`compress_with_prompt`); the rows fill their
   placeholders and get their positions (`token_layout.TokenLayout`: original positions with gaps by default;
   unused placeholders dropped and the batch re-packed for content-dependent counts);
3. language model: the stock decoder, or the method's own run of its layers (`run_language_model`);
4. reconsider: a method may ask for a second prefill with more rows (`reconsider`, DeFT `adaptive`);
5. generate: positions, the compacted mask and what the method decided go back to `generate`
   (`_update_model_kwargs_for_generation`) and onto the KV cache (`TokenLayout.record`) for later calls.

Where compression lives in transformers (DESIGN-NOTES): `generate()` encodes images through the INNER model's
`get_image_features` and hands the result to `forward` as `mm_encoder_outputs`, so every encoder-side hook runs
there. The processor writes K placeholders per item, or all N when the method's placeholder policy says so
(`writes_all_placeholders`: the model keeps K itself, or a content-dependent count).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationMixin, LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaPreTrainedModel
from transformers.utils.generic import can_return_tuple

from .compressors.compression_method import (
    CompressionMethod,
    LanguageModelCall,
    PromptBatch,
    TextBatch,
    VisualBatch,
)
from .compressors.compression_registry import build_method
from .compressors.placeholder_policy import placeholder_count, video_capable_methods
from .configuration.configuration_deft_llava import DeftLlavaConfig
from .configuration.deft_settings import num_kept_tokens
from .deft.question_conditioning import QuestionEncoder
from .deft.score_mixer import ScoreMixer
from .input_checks import check_labels, check_pixel_values, check_token_inputs
from .modeling_outputs_deft_llava import (
    DeftLlavaCausalLMOutputWithPast,
    DeftLlavaModelOutputWithPast,
    DeftVisualFeaturesOutput,
    compression_report,
)
from .text_context import TextContext
from .token_layout import (
    STATE_ATTRIBUTE,
    TokenLayout,
    check_attention_mask,
    continue_cache,
    gather_seq,
    last_real_index,
    read_cache_state,
    record_cache_state,
    tokens_dropped_since_record,
)
from .transformers_compat import (
    cache_kwargs,
    cache_of,
    resolve_cache_argument,
    rewind_cache,
    visual_output_fields,
)


def batch_share(items_here: int, num_images_in_batch: int | None) -> float:
    """Share of a batch's images and videos held by this call (`items_here` of them), the weight of a per-item
    mean loss that makes micro-batches add up to the batch mean; 1 when `num_images_in_batch` is None (this
    call is the whole batch)."""
    if num_images_in_batch is None:
        return 1.0
    total = int(num_images_in_batch)
    if total < items_here:
        raise ValueError(
            f"deft_num_images_in_batch must count every image of the batch, got {total} for a call that holds "
            f"{items_here}"
        )
    return items_here / total


def mean_over_items(feats: list, name: str) -> tuple[torch.Tensor | None, int]:
    """The per-item mean of the loss `name` over every modality of the call (`feats`: the images' and the
    videos' outputs, each holding the mean over its own items), and the number of items it covers."""
    sources = [(len(o.pooler_output), getattr(o, name)) for o in feats if getattr(o, name) is not None]
    if not sources:
        return None, 0
    items = sum(count for count, _ in sources)
    return sum(count * loss for count, loss in sources) / items, items


# ----------------------------------------------------------------------------------------------- models
class DeftLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: DeftLlavaConfig
    config_class = DeftLlavaConfig
    input_modalities = ("image", "video", "text")
    # `_keep_in_fp32_modules` is not set here: `DeFTModule` declares its `score_mixer`, and transformers collects
    # it from the model's children, so a model without DeFT (compression off, another method) names nothing
    # the saliency MLP's output bias of earlier checkpoints (see `SaliencyScorer`): it never changed an output
    _keys_to_ignore_on_load_unexpected = [r"deft\.saliency_scorer\.mlp\.4\.bias$"]

    def _init_weights(self, module: nn.Module) -> None:
        """LLaVA's initialisation, except for the DeFT modules, which transformers would leave uninitialised
        (`ScoreMixer.mixture_logits`) or draw from the global RNG (so two loads of a stock checkpoint differed).

        DeFT parameters a checkpoint lacks get defined, load-independent values: `mixture_logits` = 0 (equal
        weights, 1/3 each), the output layers of the question and position inputs (`_deft_zero_init`) = 0 (the
        seed's scores until trained), the question queries N(0, 1/semantic_dim), every other `nn.Linear` PyTorch's default scheme (weight Kaiming-uniform with a = sqrt(5),
        bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))) drawn from a generator seeded with the CRC-32 of the layer's
        name inside `DeFTModule` (`_deft_init_seed`, set by `DeftLlavaModel`). Loaded parameters are untouched
        (transformers' guarded init functions skip them)."""
        seed = getattr(module, "_deft_init_seed", None)
        if seed is None:
            super()._init_weights(module)
            return
        if isinstance(module, ScoreMixer):
            hf_init.zeros_(module.mixture_logits)
        elif isinstance(module, QuestionEncoder) and module.queries.device.type != "meta":
            generator = torch.Generator(device=module.queries.device).manual_seed(seed)
            hf_init.normal_(
                module.queries, std=1.0 / math.sqrt(module.queries.shape[-1]), generator=generator
            )
        elif getattr(module, "_deft_zero_init", False):  # output layers of the question and position inputs
            hf_init.zeros_(module.weight)
            if module.bias is not None:
                hf_init.zeros_(module.bias)
        elif isinstance(module, nn.Linear) and module.weight.device.type != "meta":
            generator = torch.Generator(device=module.weight.device).manual_seed(seed)
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                bound = 1.0 / math.sqrt(module.in_features) if module.in_features > 0 else 0.0
                hf_init.uniform_(module.bias, -bound, bound, generator=generator)

    _no_split_modules = [
        "CLIPEncoderLayer",
        "SiglipEncoderLayer",
        "LlamaDecoderLayer",
        "Qwen2DecoderLayer",
        "MistralDecoderLayer",
        "DeFTModule",
    ]


class DeftLlavaModel(DeftLlavaPreTrainedModel, LlavaModel):
    """`LlavaModel` whose visual features are compressed and whose position ids keep the original layout."""

    # the layout `pixel_values` must have (named by the error for a wrong one)
    pixel_values_layout = "(num_images, channels, height, width)"

    def __init__(self, config: DeftLlavaConfig):
        config.validate_deft()  # overrides given to from_pretrained bypass the config's own __post_init__
        DeftLlavaPreTrainedModel.__init__(self, config)
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        # the compression method, under its own name (DeFT keeps the checkpoint keys `model.deft.*`)
        self.deft = None
        self.compressor = None
        self._method_name = None
        if config.use_deft:
            method = build_method(config)
            self._method_name = method.module_name
            setattr(self, method.module_name, method)
        self._built_with = {key: copy.deepcopy(getattr(config, key)) for key in self.STRUCTURAL_SETTINGS}
        self.post_init()

    # settings that decide which modules exist and their shapes: fixed once the model is built
    STRUCTURAL_SETTINGS = (
        "use_deft",
        "compression_method",
        "compression_settings",
        "deft_semantic_dim",
        "deft_saliency_hidden_dim",
        "deft_enable_rtd",
        "deft_question_aware",
        "deft_position_aware",
        "deft_rtd_bottleneck_ratio",
    )

    def _apply_config(self) -> None:
        """Settings changed on `model.config` after the model was built take effect at the next call.

        Every budget and threshold (the retention ratio, DeFT's scoring and RTD settings, each baseline's budget)
        is read from the config at call time (`CompressionMethod.apply_config`, on every copy of the method:
        each LoRA adapter's `modules_to_save` copy too), and the whole config is validated again. Settings that decide which modules exist or their shapes (`STRUCTURAL_SETTINGS`)
        cannot change on a built model, except that `use_deft` may be switched off.

        Raises:
            ValueError: a structural setting changed (names it, the built and the new value), or a new value
                is invalid.
        """
        if torch.compiler.is_compiling():
            return  # host-side bookkeeping dynamo cannot trace: done by the eager calls (see the class docstring)
        config = self.config
        for key, built in self._built_with.items():
            now = getattr(config, key)
            if now == built or (key == "use_deft" and not now):
                continue
            if key != "use_deft" and not config.use_deft:
                continue  # compression is off: the other settings are not used
            raise ValueError(
                f"config.{key} was {built!r} when this model was built and is now {now!r}: it decides which "
                f"modules exist and their shapes, so it cannot change on a built model; load it again with "
                f"from_pretrained(folder, {key}={now!r}) (only use_deft may be switched off)"
            )
        # validate and copy only when something changed: this runs at every decoding step
        snapshot = (
            tuple(config.__dict__),  # a new (misspelt) attribute changes the keys
            repr(config.deft_settings_dict()),
            config.compression_method,
            repr(config.compression_settings),
        )
        if snapshot == getattr(self, "_applied_snapshot", None):
            return
        config.validate_deft()
        # every copy of the method: PEFT's `modules_to_save` keeps one per adapter besides the base one, and
        # only the active one would answer `getattr(self, name)`; the config is the one place they read
        for module in self.modules():
            if isinstance(module, CompressionMethod):
                module.apply_config(config)
        self._applied_snapshot = snapshot

    # ------------------------------------------------------------------ the active method
    @property
    def compression_active(self) -> bool:
        return bool(self.config.use_deft) and not getattr(self, "_compression_disabled", False)

    @property
    def active_method(self):
        """The compression method this call runs (a `CompressionMethod`), or None (compression off)."""
        if self._method_name is None or not self.compression_active:
            return None
        return getattr(self, self._method_name)

    @contextmanager
    def compression_disabled(self):
        """Run the full-token model (every visual token, placeholders = N) inside this block, e.g. the
        full-token pass whose task-loss gradient gives DeFT its feedback score in training."""
        previous = getattr(self, "_compression_disabled", False)
        self._compression_disabled = True
        try:
            yield self
        finally:
            self._compression_disabled = previous

    # ------------------------------------------------------------------ step 1: encoding + compression
    def _patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = self.config.vision_config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def _feature_layer_module(self, layer: int | None = None) -> nn.Module:
        """The vision encoder layer whose output is hidden-states index `layer` (default: the feature layer,
        `vision_feature_layer`)."""
        layer = self.config.vision_feature_layer if layer is None else layer
        if not isinstance(layer, int):
            raise ValueError("methods that need CLS attention require a single int vision_feature_layer")
        encoder = getattr(self.vision_tower, "vision_model", self.vision_tower).encoder
        # hidden_states[0] is the embedding output, hidden_states[i] the output of encoder layer i - 1
        return encoder.layers[layer] if layer < 0 else encoder.layers[layer - 1]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        token_gradients: list | None = None,
        **kwargs,
    ) -> DeftVisualFeaturesOutput:
        """Vision tower -> projector -> compression method. Returns, per image, the rows for its placeholders.

        `pixel_values`: `(num_images, channels, height, width)`; all images share one size.

        As stock LLaVA's: with `return_dict=False` (or `config.return_dict=False`) the output's `to_tuple()`
        (its fields that are not None, in order: stock's first, then the compression fields).

        Raises:
            ValueError: `pixel_values` is not 4-D; `image_sizes` with compression on.
        """
        self._apply_config()
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(
                "pixel_values must be a (num_images, channels, height, width) tensor, got "
                f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
            )
        if image_sizes is not None and self.compression_active:
            raise ValueError(
                "image_sizes (images of different sizes in one batch) is not supported with use_deft"
            )
        method = self.active_method
        visual = self._visual_batch("image", self._patch_grid(pixel_values), 1, token_gradients)
        if method is not None:
            encoded = method.encode_images(
                pixel_values,
                visual,
                self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer,
                (
                    self.config.vision_feature_select_strategy
                    if vision_feature_select_strategy is None
                    else vision_feature_select_strategy
                ),
            )
            if encoded is not None:
                return encoded
        with self._vision_hooks(method, visual) as before_projector:
            outputs = LlavaModel.get_image_features(
                self,
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **kwargs,
            )
        return self._compress(outputs, visual, before_projector.get("result"))

    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        token_gradients: list | None = None,
        **kwargs,
    ) -> DeftVisualFeaturesOutput:
        """Frames through the vision tower; `pixel_values_videos`: `(num_videos, frames, channels, height, width)`.

        A video's tokens are its frames' patch tokens in frame order `(frames * patches, hidden_size)`. A method
        that compresses videos (DeFT) sees them all at once; an image method that `compresses_frames` runs the
        image path on every frame (its per-frame budget K, `F * K` rows per video, sources `frame * N + patch`).
        With `return_dict=False` (or `config.return_dict=False`) the output's `to_tuple()`, as for images.

        The calling convention is LLaVA-NeXT-Video's (`LlavaNextVideoModel.get_video_features`), the layout the
        processor writes: 5-D, one row per video. Stock `LlavaModel` has no video path. transformers' generic
        model tests (`_video_features_prepare_config_and_inputs`) rename the image tester's 4-D `pixel_values` to
        `pixel_values_videos`; a 4-D tensor is refused here rather than guessed at (one frame per video, or the
        frames of one video?), as the 5-D LLaVA-NeXT-Video and Video-LLaVA override that helper in their tests.

        Raises:
            ValueError: `pixel_values_videos` is not 5-D or has no frames; the method compresses neither videos
                nor frames (it needs the prompt or the decoder).
        """
        self._apply_config()
        if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() != 5:
            raise ValueError(
                "pixel_values_videos must be a (num_videos, frames, channels, height, width) tensor, got "
                f"{getattr(pixel_values_videos, 'shape', type(pixel_values_videos).__name__)}"
            )
        videos, frames = pixel_values_videos.shape[:2]
        if videos == 0 or frames == 0:
            raise ValueError(
                "pixel_values_videos needs at least one video of at least one frame, got shape "
                f"{tuple(pixel_values_videos.shape)}"
            )
        method = self.active_method
        if method is not None and method.compresses_frames(self.config):
            return self._compress_frames(
                pixel_values_videos, vision_feature_layer, vision_feature_select_strategy, **kwargs
            )
        visual = self._visual_batch("video", self._patch_grid(pixel_values_videos), frames, token_gradients)
        outputs = LlavaModel.get_image_features(
            self,
            pixel_values=pixel_values_videos.flatten(0, 1),  # (videos * frames, C, H, W)
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
            **kwargs,
        )
        per_frame = torch.stack(list(outputs.pooler_output))  # (videos * frames, N, D)
        outputs.pooler_output = list(per_frame.reshape(videos, -1, per_frame.shape[-1]))  # (videos, F * N, D)
        return self._compress(outputs, visual)

    def _compress_frames(self, pixel_values_videos, vision_feature_layer, strategy, **kwargs):
        """An image method on a video: every frame goes through `get_image_features` as an image (the method's
        budget K per frame); each video's rows are its frames' rows in frame order, frame f's patch p being
        source token `f * N + p` (kept tokens keep their original positions in the video)."""
        videos, frames = pixel_values_videos.shape[:2]
        per_frame = self.get_image_features(
            pixel_values_videos.flatten(0, 1), vision_feature_layer, strategy, return_dict=True, **kwargs
        )
        rows, sources = per_frame.pooler_output, per_frame.source_indices
        n = per_frame.num_source_tokens[0]

        def by_video(items):  # videos * frames entries -> one concatenation per video
            return [torch.cat(list(items[v * frames : (v + 1) * frames])) for v in range(videos)]

        scores = per_frame.compression_scores
        return DeftVisualFeaturesOutput(
            last_hidden_state=per_frame.last_hidden_state,
            hidden_states=per_frame.hidden_states,
            attentions=per_frame.attentions,
            pooler_output=by_video(rows),
            source_indices=by_video([s + (i % frames) * n for i, s in enumerate(sources)]),
            num_source_tokens=[frames * n] * videos,
            compression_scores=None if scores is None else scores.reshape(videos, frames * n),
        )

    def _visual_batch(self, modality, grid, frames, token_gradients) -> VisualBatch:
        """The `VisualBatch` a method sees; refuses a modality the active method does not compress."""
        method = self.active_method
        if method is not None and modality not in method.modalities:
            raise ValueError(
                f"compression_method={self.config.compression_method!r} supports "
                f"{' and '.join(m + 's' for m in method.modalities)} only, not {modality}"
                + (
                    ": it needs the prompt or the decoder (or writes every placeholder), so it cannot compress a "
                    "video frame by frame either; methods that take videos here: "
                    f"{video_capable_methods(self.config)}"
                    if modality == "video"
                    else ""
                )
            )
        n = grid[0] * grid[1] * frames
        return VisualBatch(
            modality=modality,
            spatial_shape=grid,
            frames=frames,
            num_kept=num_kept_tokens(n, self.config.deft_retention_ratio),
            token_gradients=token_gradients,
            feature_layer=self.config.vision_feature_layer,
            vision_tower=self.vision_tower,
            projector=self.multi_modal_projector,
            input_embeddings=self.get_input_embeddings(),
        )

    @contextmanager
    def _vision_hooks(self, method, visual: VisualBatch):
        """While the stock encoder runs: keep the feature layer's input when the method needs it (its attention
        slice is recomputed from it, SDPA-safe) and let the method compress the features that enter the
        projector (the projector then sees the K kept rows). Yields a dict that receives that result."""
        if method is not None and torch.compiler.is_compiling():
            raise NotImplementedError(
                f"torch.compile cannot trace compression method {self.config.compression_method!r}: it hooks the "
                "vision encoder during the call. Compile the model with use_deft=False, or compile its language "
                "model only (torch.compile(model.model.language_model)), which runs every decoding step"
            )
        before_projector = {}
        hooks = []
        if method is not None and method.needs_vision_layer:
            visual.vision_layer = self._feature_layer_module(method.vision_layer_index(self.config))

            def keep_input(module, args, kwargs):
                visual.layer_input = args[0] if args else kwargs["hidden_states"]

            hooks.append(visual.vision_layer.register_forward_pre_hook(keep_input, with_kwargs=True))
        if method is not None:

            def compress_before_projection(module, args):
                result = method.compress_vision_features(args[0], visual)  # args[0]: (images, N, width)
                if result is None:
                    return None
                before_projector["result"] = result
                return (result.tokens,)

            hooks.append(self.multi_modal_projector.register_forward_pre_hook(compress_before_projection))
        try:
            yield before_projector
        finally:
            for hook in hooks:
                hook.remove()

    def _compress(self, outputs, visual: VisualBatch, before_projector=None) -> DeftVisualFeaturesOutput:
        """The stock encoder's output as a `DeftVisualFeaturesOutput`, compressed by the active method."""
        features = list(outputs.pooler_output)
        n = visual.spatial_shape[0] * visual.spatial_shape[1] * visual.frames
        result = DeftVisualFeaturesOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pooler_output=features,
            source_indices=[torch.arange(f.shape[0], device=f.device) for f in features],
            num_source_tokens=[f.shape[0] for f in features],
        )
        if before_projector is not None:  # K projected rows per image, compressed before the projector
            result.source_indices = list(before_projector.kept_indices)
            result.num_source_tokens = [n] * len(features)
            result.compression_scores = before_projector.scores
        method = self.active_method
        if method is None or not features:
            return result
        if before_projector is None and features[0].shape[0] != n:
            raise ValueError(
                f"use_deft needs one token per patch: {visual.modality} features have {features[0].shape[0]} "
                f"tokens but the patch grid is {visual.spatial_shape[0]}x{visual.spatial_shape[1]} x "
                f"{visual.frames} frame(s); use vision_feature_select_strategy='default' (drops the CLS token) "
                "with a tower that has one (CLIP), 'full' with one that has none (SigLIP)"
            )
        visual.encoder_outputs = outputs
        return method.compress_features(result, visual)

    def encode_visual_inputs(
        self,
        pixel_values=None,
        pixel_values_videos=None,
        mm_encoder_outputs=None,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
        token_gradients=None,
    ) -> dict:
        """`{modality: DeftVisualFeaturesOutput}` for the visual inputs of a forward: those already encoded
        (`mm_encoder_outputs`, what `generate` passes) and those encoded here.

        Raises:
            ValueError: a modality given both as pixels and as encoder outputs; videos without a video token.
        """
        encoded = dict(mm_encoder_outputs) if mm_encoder_outputs is not None else {}
        if pixel_values is not None and encoded.get("image") is not None:
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if pixel_values_videos is not None and encoded.get("video") is not None:
            # the LLaVA video models' wording (stock LLaVA takes no video)
            raise ValueError(
                "You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time"
            )
        # token gradients: one entry per item, images first, then videos (the order of `kept_indices`)
        channels = getattr(self.config.vision_config, "num_channels", 3)
        check_pixel_values("pixel_values", pixel_values, channels, self.pixel_values_layout)
        check_pixel_values(
            "pixel_values_videos",
            pixel_values_videos,
            channels,
            "(num_videos, frames, channels, height, width)",
        )
        num_images = pixel_values.shape[0] if isinstance(pixel_values, torch.Tensor) else 0
        gradients = {"image": None, "video": None}
        if token_gradients is not None:
            num_videos = pixel_values_videos.shape[0] if isinstance(pixel_values_videos, torch.Tensor) else 0
            if len(token_gradients) != num_images + num_videos:
                raise ValueError(
                    f"deft_token_gradients must hold one (N, hidden_size) gradient per image, then per video: "
                    f"{num_images} image(s) + {num_videos} video(s), got {len(token_gradients)}"
                )
            gradients["image"] = list(token_gradients[:num_images]) or None
            gradients["video"] = list(token_gradients[num_images:]) or None
        if pixel_values is not None:
            encoded["image"] = self.get_image_features(
                pixel_values,
                vision_feature_layer,
                vision_feature_select_strategy,
                image_sizes=image_sizes,
                token_gradients=gradients["image"],
                return_dict=True,
            )
        if pixel_values_videos is not None:
            if self.config.video_token_index is None:
                raise ValueError("pixel_values_videos was given but config.video_token_index is None")
            encoded["video"] = self.get_video_features(
                pixel_values_videos,
                vision_feature_layer,
                vision_feature_select_strategy,
                token_gradients=gradients["video"],
                return_dict=True,
            )
        # images first, then videos: the order of `kept_indices`
        return {m: encoded[m] for m in ("image", "video") if encoded.get(m) is not None}

    # ------------------------------------------------------------------ step 2: placing the rows
    def _placeholder_mask(self, input_ids, inputs_embeds, token_id):
        if input_ids is not None:
            return input_ids == token_id
        token = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == token).all(-1)

    def _token_ids(self) -> dict:
        return {"image": self.config.image_token_index, "video": self.config.video_token_index}

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        deft_reconstruct: torch.Tensor | None = None,
        deft_token_gradients: list | None = None,
        deft_prompt_length: int | None = None,
        deft_generation_state: dict | None = None,
        deft_answer_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeftLlavaModelOutputWithPast:
        """LLaVA forward with compressed visual tokens.

        Args (beyond `LlavaModel.forward`):
            pixel_values_videos: `(num_videos, frames, channels, height, width)` for `<video>` placeholders.
            deft_reconstruct: `(batch,)` bool, a second prefill (`reconsider`): samples that use every row.
            deft_token_gradients: list, per image then per video, of `(N, hidden_size)` gradients of a full-token
                task loss with respect to its projected features: enables DeFT's feedback score `s_fb`.
            deft_prompt_length: the first `deft_prompt_length` tokens are the prompt, later ones were generated.
                Methods that decide from the prompt (FastV's last query, Recoverable's question) use only
                the prompt, so a full-recompute forward over prompt + generated tokens decides as the prefill
                did. Default: the whole input. `generate` passes it on (`deft_generation_state`).
            deft_generation_state: the prefill's `deft_generation_state`, passed whole to the later steps of
                `generate` (an opaque record: what the method carries from its prefill, FastV's layer gather
                index for one; the model reads none of the method's entries).
            deft_answer_mask: `(batch, seq)` bool, True on answer tokens (`labels != -100` of a training batch):
                a method that reads the prompt's question (question-aware DeFT, CDPruner, Recoverable) skips them.
                `DeftLlavaForConditionalGeneration.forward` passes it from `labels`.

        When visual tokens are present and compression is on, `position_ids` is computed here from
        `attention_mask` (original layout, gaps kept) unless `deft_keep_original_positions=False`.

        The cache may be passed as `cache` (transformers >= 5.24) or `past_key_values` (earlier releases).
        """
        past_key_values = resolve_cache_argument(cache, past_key_values)
        self._apply_config()
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        markers = (self.config.context_start_token_index, self.config.context_end_token_index)
        check_token_inputs(
            input_ids,
            inputs_embeds,
            attention_mask,
            past_key_values.get_seq_length() if past_key_values is not None else 0,
            getattr(self.get_input_embeddings(), "num_embeddings", None),
            tuple(m for m in markers if m is not None),
        )
        visual = self.encode_visual_inputs(
            pixel_values,
            pixel_values_videos,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_sizes,
            deft_token_gradients,
        )
        context = self._find_context(input_ids, attention_mask, past_key_values)
        if inputs_embeds is None:
            # the markers never reach the language model: they need no embedding row of their own
            ids = input_ids if context is None else input_ids.masked_fill(context.markers, 0)
            inputs_embeds = self.get_input_embeddings()(ids)
        state = dict(deft_generation_state or {})
        if deft_prompt_length is not None:  # the call's own prompt length comes first
            state["deft_prompt_length"] = deft_prompt_length
        if not visual and context is None:
            return self._continue(inputs_embeds, attention_mask, position_ids, past_key_values, kwargs, state)
        return self._prefill(
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            visual,
            state.get("deft_prompt_length"),  # a full recompute in generate decides on the prompt
            deft_reconstruct,
            kwargs,
            context,
            deft_answer_mask,
        )

    def _find_context(self, input_ids, attention_mask, cache) -> TextContext | None:
        """The `<context> ... </context>` spans of `input_ids` (`text_context.py`), or None.

        Raises:
            ValueError: markers in a call that continues a cache (a context in a later turn, or a generated
                marker); markers that do not pair up; a method that runs the decoder on the input layout.
        """
        start, end = self.config.context_start_token_index, self.config.context_end_token_index
        if input_ids is None or start is None:
            return None
        if not bool(((input_ids == start) | (input_ids == end)).any()):
            return None
        cached = cache.get_seq_length() if cache is not None else 0
        if cached:
            raise ValueError(
                f"input_ids hold context markers (ids {start}, {end}) in a call that continues a cache of {cached} "
                "tokens: a context is compressed in the prefill only; send the whole conversation (with its "
                "context) without past_key_values, and keep the markers out of generated text "
                f"(generate(..., suppress_tokens=[{start}, {end}]))"
            )
        check_attention_mask(attention_mask)
        method = self.active_method
        if method is not None and method.needs_input_layout:
            raise ValueError(
                f"compression_method={self.config.compression_method!r} runs the decoder layers on the input "
                "layout and cannot take a <context> (its markers are dropped before the language model); use "
                "another method, or send the context without markers"
            )
        return TextContext.find(input_ids, attention_mask, start, end)

    def _prefill(
        self,
        input_ids,
        inputs_embeds,
        attention_mask,
        position_ids,
        cache,
        visual,
        prompt_length,
        reconsidered,
        kwargs,
        context=None,
        answer_mask=None,
    ) -> DeftLlavaModelOutputWithPast:
        """A forward with visual inputs or a text context: steps 2 and 3 of the pipeline (module docstring)."""
        method = self.active_method
        prompt_length = inputs_embeds.shape[1] if prompt_length is None else int(prompt_length)
        if method is not None:
            check_attention_mask(attention_mask)
        layout = TokenLayout.start(inputs_embeds, attention_mask)
        token_ids = self._token_ids()
        masks = {m: self._placeholder_mask(input_ids, inputs_embeds, token_ids[m]) for m in visual}
        if method is not None and method.acts_in("compress_with_prompt"):
            text = self._question_text(input_ids, inputs_embeds, layout, masks, context, answer_mask)
            self._compress_with_prompt(method, visual, inputs_embeds, masks, text, prompt_length)
        for modality, features in visual.items():
            inputs_embeds = layout.place(
                modality, features, masks[modality], inputs_embeds, self.config, reconsidered
            )
        if context is not None:
            inputs_embeds = self._compress_context(method, context, inputs_embeds, layout)
        original_positions = method is not None and self.config.deft_keep_original_positions
        if method is not None or context is not None:
            inputs_embeds, attention_mask, position_ids = layout.arrange(
                inputs_embeds, attention_mask, position_ids, original_positions
            )
        layout.position_ids = position_ids
        outputs = self._run_language_model(
            LanguageModelCall(
                inputs_embeds, attention_mask, position_ids, cache, kwargs, layout, prompt_length
            )
        )
        state = dict(outputs.deft_generation_state or {})
        if method is not None and method.decides_on_prompt:
            state["deft_prompt_length"] = prompt_length  # later steps decide on the same prompt
        layout.record(cache_of(outputs), state, original_positions)
        for key, value in self._report(outputs, layout, visual, state).items():
            setattr(outputs, key, value)
        return outputs

    def placeholders_per_item(self, features) -> list[int]:
        """Placeholders each item of `features` (what `get_image_features` / `get_video_features` return) fills:
        its rows, or, while a method that selects with the prompt still holds its N rows, the count the
        processor wrote for it (`placeholder_count` of its N source tokens)."""
        method = self.active_method
        if method is None or not (method.decides_on_prompt and method.acts_in("compress_with_prompt")):
            return [len(rows) for rows in features.pooler_output]
        c = self.config
        return [
            placeholder_count(
                n,
                c.use_deft,
                c.deft_retention_ratio,
                c.deft_inference_mode,
                c.compression_method,
                c.compression_settings,
            )
            for n in features.num_source_tokens
        ]

    def _question_text(self, input_ids, inputs_embeds, layout, masks, context, answer_mask) -> torch.Tensor:
        """`(batch, seq)` bool, the real text a method may read as the question: not padding, not a placeholder
        of any modality, not a context marker, not an answer token of a training batch (`answer_mask`)."""
        text = layout.valid.clone()
        for modality, token_id in self._token_ids().items():
            if token_id is not None:
                placeholders = masks.get(modality)
                if placeholders is None:
                    placeholders = self._placeholder_mask(input_ids, inputs_embeds, token_id)
                text &= ~placeholders
        if context is not None:
            text &= ~context.markers
        if answer_mask is not None:  # a training batch: the answer is never read as the question
            if tuple(answer_mask.shape) != tuple(text.shape):
                raise ValueError(
                    f"labels {tuple(answer_mask.shape)} must have the shape of input_ids {tuple(text.shape)}"
                )
            text &= ~answer_mask.to(device=text.device, dtype=torch.bool)
        return text

    def _compress_with_prompt(self, method, visual: dict, inputs_embeds, masks, text, prompt_length) -> None:
        """Each modality's features, compressed by the method once the prompt is known (in place in `visual`)."""
        for modality, features in visual.items():
            if features.pooler_output:
                rows = int(features.pooler_output[0].shape[0])
                prompt = PromptBatch(
                    inputs_embeds,
                    masks[modality],
                    text,
                    prompt_length,
                    modality,
                    num_kept=num_kept_tokens(rows, self.config.deft_retention_ratio),
                    input_embeddings=self.get_input_embeddings(),
                    projector=self.multi_modal_projector,
                )
                visual[modality] = self._compress_items_with_prompt(method, features, prompt)

    def _compress_items_with_prompt(self, method, features, prompt: PromptBatch):
        """The method's `compress_with_prompt` on one modality's items (`DeftLlavaNextModel` overrides it: each
        token set of each AnyRes image, with that image's own prompt)."""
        return method.compress_with_prompt(features, prompt)

    @staticmethod
    def _report(outputs, layout: TokenLayout, visual: dict, state: dict) -> dict:
        """What a prefill reports (`COMPRESSION_REPORT_FIELDS`, the features used and stock's visual fields):
        the layout's, the features', and what a method inside the language model reported itself."""
        features = [visual[m] for m in ("image", "video") if visual.get(m) is not None]
        first = features[0] if features else None
        return {
            **visual_output_fields(visual.get("image"), visual.get("video")),
            "image_features_output": visual.get("image"),
            "video_features_output": visual.get("video"),
            # a method in the language model (FastV) reports its own kept tokens and ranking
            "kept_indices": layout.kept_indices if outputs.kept_indices is None else outputs.kept_indices,
            "compression_scores": (
                outputs.compression_scores
                if outputs.compression_scores is not None
                else (first.compression_scores if first is not None else None)
            ),
            "mixture_weights": first.mixture_weights if first is not None else None,
            "num_reconstructed": layout.num_reconstructed,
            "text_kept_indices": layout.text_kept_indices,
            "deft_position_ids": layout.position_ids,
            "deft_attention_mask": layout.attention_mask,
            "deft_gather_index": layout.gather_index,
            "deft_generation_state": state or None,
        }

    def _compress_context(self, method, context: TextContext, inputs_embeds, layout: TokenLayout):
        """The method keeps `deft_text_retention_ratio` of each sample's context tokens (`compress_text`), or
        every one (text compression off, or a method that does not compress text); the markers are dropped.
        Returns the input embeddings with the method's context rows in place."""
        keep = ~context.markers  # (batch, seq)
        ratio = self.config.deft_text_retention_ratio
        if (
            method is not None
            and ratio is not None
            and "text" in method.modalities
            and context.index.shape[1]
        ):
            text = TextBatch(context.pack(inputs_embeds), context.token_mask, float(ratio))
            selection = method.compress_text(text)
            if selection is not None:
                if selection.tokens is not None:
                    inputs_embeds = context.place(inputs_embeds, selection.tokens)
                keep &= ~context.tokens | context.unpack(selection.kept)
        layout.mark_context(context.markers, keep, context.kept_indices(keep))
        return inputs_embeds

    def _continue(self, inputs_embeds, attention_mask, position_ids, cache, kwargs, generation_state):
        """A forward without visual inputs: decoding steps, or a later turn that reuses a cache.

        A cache this model wrote carries what the next call needs (`token_layout.record_cache_state`): new
        tokens continue the cached positions, and prompt-dependent methods get what the prefill decided
        (`generation_state`, passed on whole: the prompt length and the method's own entries) unless the call
        passes its own.

        Raises:
            ValueError: the cache was re-packed (`hybrid`/`adaptive`, Recoverable) and the attention mask does
                not describe the cached tokens (a later turn with the uncompressed history).
        """

        def refusal(given, expected):
            held = cache.get_seq_length() if cache is not None else 0
            given = "none" if given is None else given.tolist()
            expected = "unknown" if expected is None else expected.tolist()
            return (
                f"this cache holds {held} re-packed tokens (a <context> whose markers were dropped, "
                f"deft_inference_mode {self.config.deft_inference_mode!r} or compression_method "
                f"{self.config.compression_method!r} dropped placeholders), and this call's position ids "
                f"{given} do not continue it (the next positions are {expected}): a later turn cannot reuse it, "
                "since its input ids and attention mask no longer line up with it; call generate "
                "with the whole conversation and its images, without past_key_values (or use "
                "deft_inference_mode='fast', whose caches can be continued)"
            )

        continuation = continue_cache(cache, inputs_embeds, attention_mask, position_ids, refusal)
        state = dict(continuation.generation_state or {})
        state.update({k: v for k, v in generation_state.items() if v is not None})
        outputs = self._run_language_model(
            LanguageModelCall(
                inputs_embeds,
                attention_mask,
                continuation.position_ids,
                cache,
                kwargs,
                prompt_length=state.get("deft_prompt_length"),
                generation_state=state,
            )
        )
        if continuation.generation_state is not None:
            record_cache_state(cache_of(outputs), continuation.position_ids, continuation.new_valid)
        return outputs

    # ------------------------------------------------------------------ step 3: the language model
    def _run_language_model(self, call: LanguageModelCall) -> DeftLlavaModelOutputWithPast:
        """The stock language model, unless the active method runs the decoder layers itself."""
        method = self.active_method
        if method is not None:
            call.language_model = self.language_model
            call.output_flags = {
                key: getattr(self.config, key, False) for key in ("output_attentions", "output_hidden_states")
            }
            if call.layout is not None and "image" in call.layout.placeholder_masks:
                rows = call.layout.rows_per_item["image"][0]
                call.num_kept = num_kept_tokens(rows, self.config.deft_retention_ratio)
            outputs = method.run_language_model(call)
            if outputs is not None:
                return outputs
        outputs = self.language_model(
            attention_mask=call.attention_mask,
            position_ids=call.position_ids,
            inputs_embeds=call.inputs_embeds,
            **cache_kwargs(call.cache),
            **call.kwargs,
        )
        return DeftLlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **cache_kwargs(cache_of(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class DeftLlavaForConditionalGeneration(
    DeftLlavaPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin
):
    """LLaVA with DeFT compression in its forward pass, for `generate`, `pipeline` and `Trainer`.

    With `use_deft=False` it computes exactly what `LlavaForConditionalGeneration` computes. What stays different
    from stock, and why: outputs carry extra fields (kept indices, compression scores, the loss components),
    appended after stock's in `to_tuple()`; `get_video_features` exists (5-D, LLaVA-NeXT-Video's convention, see
    `DeftLlavaModel.get_video_features`); `_keep_in_fp32_modules` is collected from the DeFT module when one exists.

    `torch.compile(model.forward, fullgraph=True)` traces the model with compression off, and with methods that
    encode images themselves (`tome`). Methods that hook the vision encoder during the call (DeFT, `random`,
    `uniform`, ...) refuse a full graph with a `NotImplementedError` naming the method; without `fullgraph`
    they compile with graph breaks and compute what the eager model computes. While compiling, the config is not
    re-validated and the placeholder counts are not checked (`_apply_config`, `TokenLayout.place`): eager calls do.

    After a prefill the method may ask for a second one (`reconsider`: DeFT's `adaptive` mode checks each
    sample's next-token distribution with the RTD rule, normalised entropy > `deft_rtd_entropy_threshold` or
    max probability < `deft_rtd_confidence_threshold`); the uncertain samples then get every RTD-rebuilt row
    (the cache is rewound first).
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    # the older llava-hf key layout (public llava-hf repos; stock `save_pretrained` still writes it): the
    # library converts it only for its own classes, so remote code maps it explicitly
    LEGACY_KEY_MAPPING = {
        r"^language_model\.model": "model.language_model",
        r"^language_model\.lm_head": "lm_head",
        r"^vision_tower": "model.vision_tower",
        r"^multi_modal_projector": "model.multi_modal_projector",
    }

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`from_pretrained` that also reads stock llava-hf folders (either key layout). DeFT config keys can
        be passed as overrides (`use_deft=True, deft_retention_ratio=0.25`); DeFT weights absent from the
        folder are initialised fresh and reported by transformers as newly initialised."""
        kwargs.setdefault("key_mapping", dict(cls.LEGACY_KEY_MAPPING))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            # safetensors' own message names no file ("incomplete metadata, file not fully covered")
            raise OSError(
                f"cannot read the safetensors weights of {str(pretrained_model_name_or_path)!r} ({error}); the "
                "file is truncated or corrupt: download or copy it again"
            ) from error

    def __init__(self, config: DeftLlavaConfig):
        DeftLlavaPreTrainedModel.__init__(self, config)
        self.model = DeftLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_video_features(self, pixel_values_videos: torch.Tensor, **kwargs):
        return self.model.get_video_features(pixel_values_videos=pixel_values_videos, **kwargs)

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, with the `<context>` markers (`config.context_start_token_index`,
        `context_end_token_index`) kept out of the generated text: they are added to `suppress_tokens` unless the
        call sets `suppress_tokens` itself. A marker the model emitted would open a context in a call that continues
        the cache, which is refused (`_find_context`); the markers are prompt structure, never an answer."""
        markers = [
            i
            for i in (self.config.context_start_token_index, self.config.context_end_token_index)
            if i is not None
        ]
        if markers and "suppress_tokens" not in kwargs:
            config = kwargs.get("generation_config") or self.generation_config
            listed = list(getattr(config, "suppress_tokens", None) or [])
            kwargs["suppress_tokens"] = listed + [m for m in markers if m not in listed]
        return super().generate(*args, **kwargs)

    def create_masks_for_generate(self, *args, attention_mask=None, **kwargs):
        """Keep the 2-D padding mask in `generate`.

        With a compileable (static) cache, `generate` would turn the 2-D mask into a 4-D one before `forward`;
        compression needs the 2-D mask (original positions, re-packing, in-LLM pruning) and the language model
        builds its own 4-D mask from it for any cache, so the 2-D mask is passed on unchanged. (A hook of
        `GenerationMixin.prepare_inputs_for_generation`, see `transformers_compat`.)"""
        return attention_mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        deft_token_gradients: list | None = None,
        deft_prompt_length: int | None = None,
        deft_generation_state: dict | None = None,
        deft_num_images_in_batch: int | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeftLlavaCausalLMOutputWithPast:
        r"""LLaVA forward with compression. `deft_token_gradients`, `deft_prompt_length`,
        `deft_generation_state`: see `DeftLlavaModel.forward`. The cache may be passed as `cache`
        (transformers >= 5.24) or `past_key_values` (earlier releases).

        Training loss (`self.training`): `lm_loss + deft_rtd_loss_weight * rtd_loss + deft_feedback_loss_weight *
        feedback_loss`. For a batch split into micro-batches (gradient accumulation, several processes), pass
        `num_items_in_batch` (answer tokens of the whole batch: `lm_loss` becomes this call's token sum over it)
        and `deft_num_images_in_batch` (images of the whole batch, a video counting as one): the DeFT terms, means
        over this call's images, are weighted by this call's share of them, so the micro-batches' losses add up
        to the whole batch's loss. `DeftLlavaTrainer` passes both."""
        past_key_values = resolve_cache_argument(cache, past_key_values)
        check_labels(labels, input_ids, inputs_embeds, self.config.text_config.vocab_size)
        # encode once: a method may ask for a second prefill (`reconsider`) on the same features
        mm_encoder_outputs = self.model.encode_visual_inputs(
            pixel_values,
            pixel_values_videos,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_sizes,
            deft_token_gradients,
        )
        model_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            mm_encoder_outputs=mm_encoder_outputs,
            deft_prompt_length=deft_prompt_length,
            deft_generation_state=deft_generation_state,
            # labels mark the answer: methods that read the question never read it
            deft_answer_mask=(labels != -100) if labels is not None and mm_encoder_outputs else None,
            return_dict=True,  # the fields below; `config.return_dict=False` applies to this method's output only
        )
        cached_before = past_key_values.get_seq_length() if past_key_values is not None else 0
        state_before = read_cache_state(past_key_values)
        outputs = self.model(**model_kwargs, **kwargs)
        if mm_encoder_outputs:
            outputs = self._reconsider(outputs, model_kwargs, cached_before, state_before, kwargs)

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        feats = [o for o in (outputs.image_features_output, outputs.video_features_output) if o is not None]
        losses = self._losses(logits, labels, outputs, feats, deft_num_images_in_batch, kwargs)
        return DeftLlavaCausalLMOutputWithPast(
            **losses,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_kwargs(cache_of(outputs)),
            **visual_output_fields(outputs.image_features_output, outputs.video_features_output),
            **compression_report(outputs),
        )

    def _reconsider(self, outputs, model_kwargs, cached_before, state_before, kwargs):
        """Step 4: the prefill again when the method asks for more rows for some samples (`reconsider`);
        the cache is rewound to what it held before this prefill (earlier turns stay)."""
        method = self.model.active_method
        if method is None:
            return outputs
        # the head on each sample's last prompt token only when the method reads it (not on every prefill)
        hidden = outputs.last_hidden_state
        last = self._last_prompt_token(outputs, model_kwargs, hidden.shape[1])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        reconsidered = method.reconsider(lambda: self.lm_head(hidden[rows, last.to(hidden.device)]))
        if reconsidered is None or not bool(reconsidered.any()):
            return outputs
        cache = model_kwargs["past_key_values"]
        if cache is not None:
            rewind_cache(cache, cached_before)
            setattr(cache, STATE_ATTRIBUTE, state_before)  # what the cache recorded before this prefill
        return self.model(**model_kwargs, deft_reconstruct=reconsidered, **kwargs)

    @staticmethod
    def _last_prompt_token(outputs, model_kwargs, width) -> torch.Tensor:
        """`(batch,)` column of each sample's last real prompt token in the layout the language model saw
        (`width` columns): tokens after the prompt (`deft_prompt_length`: the drafts of assisted decoding) are
        the last columns of every row; padding, left or right, is skipped."""
        ids = (
            model_kwargs["input_ids"]
            if model_kwargs["input_ids"] is not None
            else model_kwargs["inputs_embeds"]
        )
        batch, seq = ids.shape[:2]
        prompt = model_kwargs.get("deft_prompt_length")
        tail = 0 if prompt is None else seq - int(prompt)
        mask = outputs.deft_attention_mask
        if mask is None:
            mask = model_kwargs["attention_mask"]
        if mask is None or mask.dim() != 2:
            mask = torch.ones(batch, width, dtype=torch.long, device=ids.device)
        return last_real_index(mask[:, -width:][:, : width - tail])

    def _losses(self, logits, labels, outputs, feats, num_images_in_batch, kwargs) -> dict:
        """`loss`, `lm_loss`, `rtd_loss`, `feedback_loss` (None when not computed). Labels follow the layout the
        language model saw (re-packed when placeholders were dropped)."""
        lm_loss = loss = None
        if labels is not None:
            if outputs.deft_gather_index is not None:
                labels = gather_seq(labels, outputs.deft_gather_index.to(labels.device), -100)
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = lm_loss
        # images and videos together: each loss is the mean over every item of the call (before, only the first
        # modality's loss was kept, and a mixed batch's videos did not train)
        rtd_loss, rtd_items = mean_over_items(feats, "rtd_loss")
        feedback_loss, feedback_items = mean_over_items(feats, "feedback_loss")
        # total training loss: lm + deft_rtd_loss_weight * rtd + deft_feedback_loss_weight * feedback
        if loss is not None and self.training:
            if rtd_loss is not None:
                share = batch_share(rtd_items, num_images_in_batch)
                loss = loss + self.config.deft_rtd_loss_weight * share * rtd_loss
            if feedback_loss is not None:
                share = batch_share(feedback_items, num_images_in_batch)
                loss = loss + self.config.deft_feedback_loss_weight * share * feedback_loss
        return {"loss": loss, "lm_loss": lm_loss, "rtd_loss": rtd_loss, "feedback_loss": feedback_loss}

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        """Hand the prefill's position ids (gaps kept), compacted mask and `deft_generation_state` (an opaque
        record: the prompt length a prompt-dependent method decided on, the method's own state) back to
        `generate`, which passes the record whole to every later step."""
        state = getattr(outputs, "deft_generation_state", None)
        if (
            state and model_kwargs.get("deft_generation_state") is None
        ):  # the prefill's holds for the generation
            model_kwargs["deft_generation_state"] = state
        positions = getattr(outputs, "deft_position_ids", None)
        cache = cache_of(outputs)
        if positions is not None and cache is not None:
            # the prefill's positions and mask cover every token it saw; `super` appends the `num_new_tokens`
            # just accepted. In assisted decoding the prefill also saw the drafts: those accepted are among the
            # new tokens, those rejected were cropped from the cache. Both are cut here, so the positions and
            # the mask follow the cache's length (the next token sits where the first rejected draft was).
            cut = tokens_dropped_since_record(cache) + num_new_tokens - 1
            model_kwargs["position_ids"] = positions[:, : positions.shape[1] - cut]
            if outputs.deft_attention_mask is not None:
                mask = outputs.deft_attention_mask
                model_kwargs["attention_mask"] = mask[:, : mask.shape[1] - cut]
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )

    def _assisted_decoding(self, input_ids, *args, **kwargs):
        """Assisted and prompt-lookup decoding: their first forward is the prefill over the prompt AND the first
        drafts. Methods that decide on the prompt (FastV's ranking query, the question of Recoverable, DeFT
        `adaptive`'s uncertainty check) must not read the drafts, so that forward gets the prompt's length
        (`prepare_inputs_for_generation`); the draft model's own arguments stay untouched."""
        previous = getattr(self, "_deft_assisted_prompt_length", None)
        self._deft_assisted_prompt_length = input_ids.shape[1]
        try:
            return super()._assisted_decoding(input_ids, *args, **kwargs)
        finally:
            self._deft_assisted_prompt_length = previous

    def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
        """Stock's, plus in assisted decoding: the first forward gets the prompt's length, and context markers
        among the drafts (prompt lookup copies them from the prompt) become plain tokens (id 0, as the markers'
        own rows): a marker a draft proposes is verified, never read as a context. A marker the model itself
        generates is refused at the next step, as in plain decoding."""
        model_inputs = super().prepare_inputs_for_generation(input_ids, *args, **kwargs)
        prompt_length = getattr(self, "_deft_assisted_prompt_length", None)
        ids = model_inputs.get("input_ids")
        if not prompt_length or ids is None:
            return model_inputs
        first = bool(kwargs.get("is_first_iteration"))
        if first and model_inputs.get("deft_prompt_length") is None:
            model_inputs["deft_prompt_length"] = prompt_length
        markers = [self.config.context_start_token_index, self.config.context_end_token_index]
        if markers[0] is not None:
            drafts = (
                ids[:, prompt_length:] if first else ids[:, 1:]
            )  # later passes: the last accepted token first
            is_marker = torch.isin(drafts, torch.tensor(markers, device=ids.device))
            if bool(is_marker.any()):
                ids = ids.clone()
                ids[:, ids.shape[1] - drafts.shape[1] :] = drafts.masked_fill(is_marker, 0)
                model_inputs["input_ids"] = ids
        return model_inputs

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        """Beam search / `num_return_sequences`: expand the compression bookkeeping with the features.

        The parent method regroups `pooler_output` per sample; we tag every item with its index, let the
        parent regroup the tags, and apply the same order to every per-item field."""
        order = {}
        originals = {}
        for modality, out in mm_encoder_output.items():
            if isinstance(out, DeftVisualFeaturesOutput):
                originals[modality] = out
                # as many rows as placeholders: the parent groups the items by the samples' placeholder counts
                counts = self.model.placeholders_per_item(out)
                tags = [torch.full((c, 1), i, dtype=torch.long) for i, c in enumerate(counts)]
                mm_encoder_output[modality] = BaseModelOutputWithPooling(pooler_output=tags)
        expanded = super()._expand_multimodal_outputs(
            input_ids, mm_encoder_output, expand_size, inputs_embeds
        )
        for modality, out in originals.items():
            order[modality] = [int(t[0, 0]) for t in expanded[modality].pooler_output]
            out.select_items(order[modality])  # every per-item field, in the same order
            expanded[modality] = out
        return expanded


__all__ = [
    "DeftLlavaForConditionalGeneration",
    "DeftLlavaModel",
    "DeftLlavaPreTrainedModel",
    "DeftLlavaCausalLMOutputWithPast",
    "DeftVisualFeaturesOutput",
]
