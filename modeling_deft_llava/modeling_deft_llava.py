"""DeFT-LLaVA: `LlavaForConditionalGeneration` with token compression inside the forward pass.

Where compression lives (transformers 5.23, see DESIGN-NOTES): `generate()` encodes images through the INNER
model's `get_image_features` and hands the result to `forward` as `mm_encoder_outputs`. So:

1. `DeftLlavaModel.get_image_features` / `get_video_features` run the vision tower, the projector and the
   compressor, and return per image the rows that go into the placeholders, with the source patch index of
   every row (`DeftVisualFeaturesOutput`).
2. `DeftLlavaModel.forward` scatters the rows into the placeholders, gives every token its ORIGINAL position
   id (kept patch j of an image starting at position S sits at S + j; the text after an image of N patches
   resumes at S + N: the gaps stay), and, for content-dependent counts (RTD `hybrid`/`adaptive`), drops the
   unused placeholders and re-packs the batch with left padding.
3. `DeftLlavaForConditionalGeneration` adds the head, the `adaptive` second prefill, label re-packing and
   hands the positions and the compacted mask back to `generate` (`_update_model_kwargs_for_generation`).

Fixed budgets (`deft_inference_mode="fast"`): the processor writes K = `config.num_kept_tokens(N)`
placeholders per image; nothing is re-packed. Variable budgets: the processor writes all N placeholders.

Baselines (`compression_method`): the model dispatches on the compressor's `stage`, never on its name:
`"features"` compresses in `get_image_features`; `"vision_encoder"` (ToMe) runs the vision encoder itself
(`_encode_in_vision_encoder`); `"features_with_text"` (Recoverable) compresses in `forward` once the prompt's
text is known (`_compress_with_text`, then the re-packing path); `"language_model"` (FastV, FiCoCo-L) runs the decoder
layers itself (`_language_model_forward`). Prompt-dependent decisions use the first `deft_prompt_length`
tokens; `generate` receives it, and FastV's layer gather index, through `deft_generation_state`.
"""

from __future__ import annotations

import copy
import math
import zlib
from contextlib import contextmanager

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration, LlavaModel
from transformers import initialization as hf_init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaPreTrainedModel,
)
from transformers.utils.generic import can_return_tuple

from .cache_state import continued_position_ids, read_cache_state, record_cache_state
from .compressors.compression_registry import build_compressor
from .compressors.token_compressor import CompressionContext
from .compressors.vision_attention import cls_attention, patch_keys
from .configuration.configuration_deft_llava import DEFT_METHOD, DeftLlavaConfig
from .configuration.deft_settings import num_kept_tokens
from .deft.deft_module import DeFTModule
from .deft.score_mixer import ScoreMixer
from .deft.token_dictionary import sample_is_uncertain
from .modeling_outputs_deft_llava import (
    DeftLlavaCausalLMOutputWithPast,
    DeftLlavaModelOutputWithPast,
    DeftVisualFeaturesOutput,
)
from .original_positions import original_position_ids, scatter_rows
from .sequence_packing import gather_seq, repack_left
from .transformers_compat import (
    cache_kwargs,
    cache_of,
    resolve_cache_argument,
    rewind_cache,
    visual_output_fields,
)


def compressor_for_config(config: DeftLlavaConfig):
    """The baseline compressor `config.compression_method` names, for the width of the features it compresses:
    the language model's hidden size, or the vision width for a `feature_space="vision"` method."""
    compressor = build_compressor(
        config.compression_method, config.text_config.hidden_size, config.compression_settings
    )
    if compressor.stage == "features" and compressor.feature_space == "vision":
        layers = config.vision_feature_layer
        width = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        compressor = build_compressor(config.compression_method, width, config.compression_settings)
    return compressor


def batch_share(features: DeftVisualFeaturesOutput, num_images_in_batch: int | None) -> float:
    """Share of a batch's images held by this call (`features`: one entry per image or video), the weight of a
    per-image mean loss that makes micro-batches add up to the batch mean; 1 when `num_images_in_batch` is None
    (this call is the whole batch)."""
    if num_images_in_batch is None:
        return 1.0
    here, total = len(features.pooler_output), int(num_images_in_batch)
    if total < here:
        raise ValueError(
            f"deft_num_images_in_batch must count every image of the batch, got {total} for a call that holds {here}"
        )
    return here / total


# ----------------------------------------------------------------------------------------------- models
class DeftLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: DeftLlavaConfig
    config_class = DeftLlavaConfig
    input_modalities = ("image", "video", "text")
    # the mixture logits stay float32 when loading in float16: a large logit would overflow and make the
    # mixture NaN (bf16 has the float32 range); the mixer also computes its softmax in float32
    _keep_in_fp32_modules = ["score_mixer"]
    # the saliency MLP's output bias of earlier checkpoints (see `SaliencyScorer`): it never changed an output
    _keys_to_ignore_on_load_unexpected = [r"deft\.saliency_scorer\.mlp\.4\.bias$"]

    def _init_weights(self, module: nn.Module) -> None:
        """LLaVA's initialisation, except for the DeFT modules, which transformers would leave uninitialised
        (`ScoreMixer.mixture_logits`) or draw from the global RNG (so two loads of a stock checkpoint differed).

        DeFT parameters a checkpoint lacks get defined, load-independent values: `mixture_logits` = 0 (equal
        weights, 1/3 each), every `nn.Linear` PyTorch's default scheme (weight Kaiming-uniform with a = sqrt(5),
        bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))) drawn from a generator seeded with the CRC-32 of the layer's
        name inside `DeFTModule` (`_deft_init_seed`, set by `DeftLlavaModel`). Loaded parameters are untouched
        (transformers' guarded init functions skip them)."""
        seed = getattr(module, "_deft_init_seed", None)
        if seed is None:
            super()._init_weights(module)
            return
        if isinstance(module, ScoreMixer):
            hf_init.zeros_(module.mixture_logits)
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

    def __init__(self, config: DeftLlavaConfig):
        config.validate_deft()  # overrides given to from_pretrained bypass the config's own __post_init__
        DeftLlavaPreTrainedModel.__init__(self, config)
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.deft = None
        self.compressor = None  # a baseline method (compression_method != "deft")
        if config.use_deft and config.compression_method != DEFT_METHOD:
            self.compressor = compressor_for_config(config)
        if config.use_deft and config.compression_method == DEFT_METHOD:
            self.deft = DeFTModule(
                token_dim=config.text_config.hidden_size,
                semantic_dim=config.deft_semantic_dim,
                retention_ratio=config.deft_retention_ratio,
                enable_rtd=config.deft_enable_rtd,
                alpha_var=config.deft_alpha_var,
                rtd_bottleneck_ratio=config.deft_rtd_bottleneck_ratio,
                saliency_hidden_dim=config.deft_saliency_hidden_dim,
                image_neighbors=config.deft_group_image_neighbors,
                video_window=config.deft_group_video_window,
                text_neighbors=config.deft_group_text_neighbors,
                entropy_threshold=config.deft_rtd_entropy_threshold,
                confidence_threshold=config.deft_rtd_confidence_threshold,
                feedback_loss_weight=config.deft_feedback_loss_weight,
                rtd_loss_weight=config.deft_rtd_loss_weight,
            )
            for name, module in self.deft.named_modules():  # see DeftLlavaPreTrainedModel._init_weights
                module._deft_init_seed = zlib.crc32(name.encode())
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
        "deft_rtd_bottleneck_ratio",
    )
    # DeFTModule attribute <- config key: read from the config at every call
    CALL_TIME_SETTINGS = {
        "retention_ratio": "deft_retention_ratio",
        "alpha_var": "deft_alpha_var",
        "image_neighbors": "deft_group_image_neighbors",
        "video_window": "deft_group_video_window",
        "text_neighbors": "deft_group_text_neighbors",
        "entropy_threshold": "deft_rtd_entropy_threshold",
        "confidence_threshold": "deft_rtd_confidence_threshold",
        "feedback_loss_weight": "deft_feedback_loss_weight",
        "rtd_loss_weight": "deft_rtd_loss_weight",
    }

    def _apply_config(self) -> None:
        """Settings changed on `model.config` after the model was built take effect at the next call.

        Every budget and threshold (the retention ratio, DeFT's scoring and RTD settings, each baseline's budget)
        is read from the config at call time, and the whole config is validated again. Settings that decide which
        modules exist or their shapes (`STRUCTURAL_SETTINGS`) cannot change on a built model, except that
        `use_deft` may be switched off.

        Raises:
            ValueError: a structural setting changed (names it, the built and the new value), or a new value
                is invalid.
        """
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
        if self.deft is not None:
            for attribute, key in self.CALL_TIME_SETTINGS.items():
                setattr(self.deft, attribute, getattr(config, key))
        self._applied_snapshot = snapshot

    # ------------------------------------------------------------------ encoding + compression
    @property
    def compression_active(self) -> bool:
        return bool(self.config.use_deft) and not getattr(self, "_compression_disabled", False)

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

    def _patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        patch = self.config.vision_config.patch_size
        return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        token_gradients: list | None = None,
        **kwargs,
    ) -> DeftVisualFeaturesOutput:
        """Vision tower -> projector -> compressor. Returns, per image, the rows for its placeholders.

        `pixel_values`: `(num_images, channels, height, width)`; all images share one size."""
        kwargs.pop("return_dict", None)  # always a DeftVisualFeaturesOutput
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
        if self.compression_stage == "vision_encoder":
            return self._encode_in_vision_encoder(
                pixel_values, vision_feature_layer, vision_feature_select_strategy
            )
        captured = {}
        hooks = []
        stage, compressor = self.compression_stage, self.compressor
        if stage in ("features", "features_with_text") and (
            compressor.needs_cls_attention or compressor.needs_vision_keys
        ):
            # keep the input of the feature layer: the method's attention slice is recomputed from it (SDPA-safe)
            def keep_input(module, args, kwargs):
                captured["x"] = args[0] if args else kwargs["hidden_states"]

            hooks.append(self._feature_layer_module().register_forward_pre_hook(keep_input, with_kwargs=True))
        if stage == "features" and compressor.feature_space == "vision":
            # compress the vision features that enter the projector; the projector sees the K kept rows
            def compress_before_projection(module, args):
                selected = args[0]  # (images, N, vision width)
                out = self._compress_baseline_tokens(
                    selected, captured.get("x"), self._patch_grid(pixel_values)
                )
                captured["result"] = out
                return (out.tokens,)

            hooks.append(self.multi_modal_projector.register_forward_pre_hook(compress_before_projection))
        try:
            outputs = LlavaModel.get_image_features(
                self,
                pixel_values=pixel_values,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                image_sizes=image_sizes,
                return_dict=True,
                **kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()
        if "result" in captured:
            out = captured["result"]
            return DeftVisualFeaturesOutput(
                last_hidden_state=outputs.last_hidden_state,
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                pooler_output=list(outputs.pooler_output),  # K projected rows per image
                source_indices=list(out.kept_indices),
                num_source_tokens=[math.prod(self._patch_grid(pixel_values))] * len(outputs.pooler_output),
                compression_scores=out.scores,
            )
        return self._compress(
            outputs,
            "image",
            self._patch_grid(pixel_values),
            1,
            token_gradients,
            layer_input=captured.get("x"),
            feature_layer=vision_feature_layer,
        )

    @property
    def compression_stage(self) -> str | None:
        """Where the active baseline runs (its compressor's `stage`), or None (DeFT, or compression off)."""
        if self.compressor is None or not self.compression_active:
            return None
        return self.compressor.stage

    def _encode_in_vision_encoder(
        self, pixel_values, vision_feature_layer, strategy
    ) -> DeftVisualFeaturesOutput:
        """`"vision_encoder"` methods (ToMe): the method runs the encoder layers itself and merges inside them."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = self.config.vision_feature_select_strategy if strategy is None else strategy
        if not isinstance(layer, int) or strategy != "default":
            raise ValueError(
                f"{self.compressor.name} needs one int vision_feature_layer and the 'default' strategy, got "
                f"{layer!r} and {strategy!r}"
            )
        from .compressors.method_tome import tome_layers_run  # the layer-count rule of encoder-stage methods

        vision_model = getattr(self.vision_tower, "vision_model", self.vision_tower)
        rows, cols = self._patch_grid(pixel_values)
        n = rows * cols
        encoded = self.compressor.encode(
            vision_model,
            pixel_values.to(self.vision_tower.dtype),
            tome_layers_run(len(vision_model.encoder.layers), layer),
            self.config.num_kept_tokens(n),
        )
        features = self.multi_modal_projector(encoded.hidden_states[:, 1:])  # (images, K, D), CLS dropped
        return DeftVisualFeaturesOutput(
            last_hidden_state=encoded.hidden_states,
            pooler_output=list(features),
            source_indices=list(encoded.kept_indices),
            num_source_tokens=[n] * features.shape[0],
        )

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        token_gradients: list | None = None,
        **kwargs,
    ) -> DeftVisualFeaturesOutput:
        """Frames through the vision tower; `pixel_values_videos`: `(num_videos, frames, channels, height, width)`.

        A video's tokens are its frames' patch tokens in frame order `(frames * patches, hidden_size)`."""
        kwargs.pop("return_dict", None)
        self._apply_config()
        if not isinstance(pixel_values_videos, torch.Tensor) or pixel_values_videos.dim() != 5:
            raise ValueError(
                "pixel_values_videos must be a (num_videos, frames, channels, height, width) tensor, got "
                f"{getattr(pixel_values_videos, 'shape', type(pixel_values_videos).__name__)}"
            )
        videos, frames = pixel_values_videos.shape[:2]
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
        grid = self._patch_grid(pixel_values_videos)
        return self._compress(outputs, "video", grid, frames=frames, token_gradients=token_gradients)

    def _compress(
        self, outputs, modality, grid, frames, token_gradients=None, layer_input=None, feature_layer=None
    ):
        features = list(outputs.pooler_output)
        result = DeftVisualFeaturesOutput(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            pooler_output=features,
            source_indices=[torch.arange(f.shape[0], device=f.device) for f in features],
            num_source_tokens=[f.shape[0] for f in features],
        )
        if not self.compression_active or not features:
            return result
        tokens = torch.stack(features)  # (num_items, N, D)
        n = tokens.shape[1]
        if grid[0] * grid[1] * frames != n:
            raise ValueError(
                f"use_deft needs one token per patch: {modality} features have {n} tokens but the patch grid is "
                f"{grid[0]}x{grid[1]} x {frames} frame(s); use vision_feature_select_strategy='default' "
                "(drops the CLS token) with a tower that has one (CLIP), 'full' with one that has none (SigLIP)"
            )
        if self.compressor is not None:
            return self._compress_baseline(
                result, tokens, layer_input, modality, grid, outputs, feature_layer
            )
        grads = torch.stack(token_gradients) if token_gradients is not None else None
        mode = self.config.deft_inference_mode
        logits = None
        if mode == "hybrid":
            # the language model's own reading of each visual token through its vocabulary embedding
            logits = tokens @ self.get_input_embeddings().weight.t()  # (num_items, N, vocab)
        deft_mode = "hybrid" if mode in ("hybrid", "adaptive") else "fast"
        out = self.deft(
            tokens=tokens,
            modality=modality,
            spatial_shape=grid,
            inference_mode=deft_mode,
            logits=logits,
            token_gradients=grads,
        )
        result.compression_scores = out.scores
        result.mixture_weights = out.scoring_info["mixture_weights"]
        result.rtd_loss = out.rtd_loss
        result.feedback_loss = out.feedback_loss
        result.num_reconstructed = out.scoring_info["num_reconstructed"]
        if mode == "fast":
            result.pooler_output = list(out.retained_tokens)  # K rows per item
            result.source_indices = list(out.kept_indices)
            return result
        # variable budget: all N rows; kept rows are the originals, RTD rows are decoded, the rest unused
        fast_keep = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)  # (items, N)
        fast_keep.scatter_(1, out.kept_indices, True)
        rows = torch.where(fast_keep.unsqueeze(-1), tokens, torch.zeros_like(tokens))  # (items, N, D)
        usable = fast_keep.clone()
        if out.reconstructed_tokens is not None:
            # unused reconstruction slots point at a dump column n, dropped after the scatter
            idx = out.reconstructed_indices.masked_fill(~out.reconstructed_mask, n)  # (items, r)
            padded = torch.cat(
                [rows, rows.new_zeros(rows.shape[0], 1, rows.shape[2])], dim=1
            )  # (items, N+1, D)
            padded.scatter_(
                1, idx.unsqueeze(-1).expand(-1, -1, rows.shape[2]), out.reconstructed_tokens.to(rows.dtype)
            )
            rows = padded[:, :n]
            flags = torch.cat([usable, usable.new_zeros(usable.shape[0], 1)], dim=1)  # (items, N+1)
            flags.scatter_(1, idx, True)
            usable = flags[:, :n]
        result.pooler_output = list(rows)
        result.row_fast = list(fast_keep)
        # hybrid uses every usable row at once; adaptive starts from the fast rows and may add the rest
        result.row_keep = list(usable) if mode == "hybrid" else list(fast_keep)
        return result

    def _compress_baseline(
        self, result, tokens, layer_input, modality, grid, outputs=None, feature_layer=None
    ):
        """A baseline method from the registry at the same budget K as DeFT.

        `"features"` methods compress here; `"features_with_text"` methods get every row plus their visual
        context (compressed in `forward`, `_compress_with_text`); `"language_model"` methods every row."""
        if modality != "image":
            raise ValueError(
                f"compression_method={self.config.compression_method!r} supports images only, not {modality}"
            )
        stage = self.compression_stage
        if stage == "language_model":
            return result
        if stage == "features_with_text":
            attention = None
            if self.compressor.needs_cls_attention:
                attention = cls_attention(self._feature_layer_module(), layer_input)
            layer = self.config.vision_feature_layer if feature_layer is None else feature_layer
            cls_state = outputs.hidden_states[layer][:, :1]  # (images, 1, width) CLS of the feature layer
            result.cls_embeddings = self.multi_modal_projector(cls_state)[:, 0]  # (images, D)
            result.cls_attention = attention
            return result
        out = self._compress_baseline_tokens(tokens, layer_input, grid)
        result.pooler_output = list(out.tokens)
        result.source_indices = list(out.kept_indices)
        result.compression_scores = out.scores
        return result

    def _compress_baseline_tokens(self, tokens, layer_input, grid):
        """Run a `"features"` method on `(images, N, width)` tokens (projected or vision features, see
        `TokenCompressor.feature_space`) with the feature layer's CLS attention and keys it asks for."""
        layer = self._feature_layer_module() if layer_input is not None else None
        context = CompressionContext(
            spatial_shape=grid,
            num_kept=self.config.num_kept_tokens(tokens.shape[1]),
            cls_attention=cls_attention(layer, layer_input) if self.compressor.needs_cls_attention else None,
            vision_keys=patch_keys(layer, layer_input) if self.compressor.needs_vision_keys else None,
        )
        return self.compressor(tokens, context)

    def _feature_layer_module(self) -> nn.Module:
        """The vision encoder layer whose output is the feature layer (`vision_feature_layer`)."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            raise ValueError("methods that need CLS attention require a single int vision_feature_layer")
        encoder = getattr(self.vision_tower, "vision_model", self.vision_tower).encoder
        # hidden_states[0] is the embedding output, hidden_states[i] the output of encoder layer i - 1
        return encoder.layers[layer] if layer < 0 else encoder.layers[layer - 1]

    # ------------------------------------------------------------------ placing the rows
    def _placeholder_mask(self, input_ids, inputs_embeds, token_id):
        if input_ids is not None:
            return input_ids == token_id
        token = self.get_input_embeddings()(torch.tensor(token_id, device=inputs_embeds.device))
        return (inputs_embeds == token).all(-1)

    @staticmethod
    def _check_rows_per_sample(modality: str, per_sample: list[int], per_item: list[int]) -> None:
        """Every sample's placeholders must hold whole images: the images, in order, fill the samples one after
        the other. A matching total alone is not enough (5 + 3 placeholders for two images of 4 rows would put
        one image's tokens into the other sample).

        Raises:
            ValueError: names the placeholders per sample and the rows per image.
        """
        item = 0
        for sample, wanted in enumerate(per_sample):
            filled = 0
            while filled < wanted and item < len(per_item):
                filled += per_item[item]
                item += 1
            if filled != wanted:
                raise ValueError(
                    f"{modality.capitalize()} features and {modality} tokens do not match per sample: the samples "
                    f"hold {per_sample} <{modality}> placeholders, but the {len(per_item)} {modality}(s), in "
                    f"order, produce {per_item} rows, so sample {sample} would get part of a {modality}; each "
                    f"sample needs the placeholders of its own {modality}s (build inputs with DeftLlavaProcessor)"
                )

    def _place(self, modality, features_output, input_ids, inputs_embeds, token_id, reconstruct):
        """Scatter one modality's rows into its placeholders; returns embeds and per-token bookkeeping."""
        mask = self._placeholder_mask(input_ids, inputs_embeds, token_id)  # (batch, seq)
        rows = features_output.pooler_output
        counts = [r.shape[0] for r in rows]
        n_placeholders = int(mask.sum())
        if n_placeholders != sum(counts):
            # stock's wording first ("Image features and image tokens do not match, tokens: ..."): tools match on it
            raise ValueError(
                f"{modality.capitalize()} features and {modality} tokens do not match, tokens: {n_placeholders}, "
                f"features: {sum(counts)}; the text has {n_placeholders} "
                f"<{modality}> placeholders but the {len(rows)} {modality}(s) produce {sum(counts)} rows "
                f"({counts}); build inputs with DeftLlavaProcessor for this model's config "
                f"(use_deft={self.config.use_deft}, retention={self.config.deft_retention_ratio}, "
                f"mode={self.config.deft_inference_mode})"
            )
        self._check_rows_per_sample(modality, mask.sum(dim=1).tolist(), counts)
        device = inputs_embeds.device
        flat = torch.cat(list(rows), dim=0).to(device, inputs_embeds.dtype)  # (total_rows, D)
        inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), flat)
        source = torch.cat([s.to(device) for s in features_output.source_indices])  # (total_rows,)
        last = torch.cat(
            [torch.nn.functional.one_hot(torch.tensor(c - 1, device=device), c).bool() for c in counts]
        )
        n_src = torch.cat(
            [torch.full((c,), n, device=device) for c, n in zip(counts, features_output.num_source_tokens)]
        )
        advance = scatter_rows(mask, torch.where(last, n_src, torch.zeros_like(n_src)).long())
        source_index = scatter_rows(mask, source.long())
        keep = from_rtd = None
        if features_output.row_keep is not None:
            keep = scatter_rows(mask, torch.cat([k.to(device) for k in features_output.row_keep]), fill=True)
            if reconstruct is not None:  # adaptive second pass: uncertain samples use every RTD row
                keep = keep | (mask & reconstruct.to(device).view(-1, 1))
            fast = scatter_rows(mask, torch.cat([k.to(device) for k in features_output.row_fast]), fill=True)
            from_rtd = keep & ~fast  # (batch, seq)
        rows_seen = keep[mask] if keep is not None else torch.ones_like(source, dtype=torch.bool)
        kept_indices = [src[k] for src, k in zip(source.split(counts), rows_seen.split(counts))]
        return inputs_embeds, mask, advance, source_index, keep, from_rtd, kept_indices

    def _compress_with_text(self, image_out, image_mask, text_mask, inputs_embeds, prompt_length):
        """`"features_with_text"` methods (Recoverable Compression): compress each image with its question.

        The question of an image is the text that follows it in its row, up to `prompt_length`: the model's
        own input embeddings of those tokens (padding and other images' placeholders excluded). The method
        keeps K rows per image; a merged token is written into the row of its representative patch, the other
        rows are marked unused (`row_keep`), and the forward re-packs the batch. Returns a new output object.

        Args:
            image_mask: `(batch, seq)` bool, the image placeholders (N per image, images in row-major order).
            text_mask: `(batch, seq)` bool, real text tokens (not padding, not a placeholder).
            inputs_embeds: `(batch, seq, D)`; prompt_length: tokens of the prompt (later ones are generated).
        """
        tokens = torch.stack(list(image_out.pooler_output))  # (images, N, D)
        images, n, _ = tokens.shape
        where = image_mask.nonzero()  # (images * N, 2) row-major: image j holds entries j*N .. j*N + N-1
        row = where[::n, 0]  # (images,) batch row of each image
        last = where[n - 1 :: n, 1]  # (images,) column of each image's last placeholder
        columns = torch.arange(image_mask.shape[1], device=image_mask.device)
        question = text_mask[row] & (columns > last.unsqueeze(1)) & (columns < prompt_length)  # (images, seq)
        rows, cols = self._patch_grid_from_count(n)
        context = CompressionContext(
            spatial_shape=(rows, cols),
            num_kept=num_kept_tokens(n, self.config.deft_retention_ratio),
            cls_attention=image_out.cls_attention,
            cls_embedding=image_out.cls_embeddings,
            text_embeds=inputs_embeds[row].to(tokens.dtype),  # (images, seq, D)
            text_mask=question,
        )
        out = self.compressor(tokens, context)  # K tokens per image, with their representative patch
        index = out.kept_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (images, K, D)
        placed = tokens.scatter(1, index, out.tokens.to(tokens.dtype))  # (images, N, D)
        keep = torch.zeros(images, n, dtype=torch.bool, device=tokens.device).scatter_(
            1, out.kept_indices, True
        )
        result = copy.copy(image_out)
        result.pooler_output = list(placed)
        result.row_keep = list(keep)
        result.row_fast = list(keep)
        result.compression_scores = out.scores
        return result

    def _patch_grid_from_count(self, n: int) -> tuple[int, int]:
        # the grid only has to hold N patches here: the text-stage method does not use its shape
        side = math.isqrt(n)
        return (side, side) if side * side == n else (1, n)

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
        deft_layer_gather_index: torch.LongTensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeftLlavaModelOutputWithPast:
        """LLaVA forward with compressed visual tokens.

        Args (beyond `LlavaModel.forward`):
            pixel_values_videos: `(num_videos, frames, channels, height, width)` for `<video>` placeholders.
            deft_reconstruct: `(batch,)` bool, `adaptive` mode only: samples that get their RTD rows back.
            deft_token_gradients: list, per image, of `(N, hidden_size)` gradients of a full-token task loss
                with respect to that image's projected features: enables DeFT's feedback score `s_fb`.
            deft_prompt_length: the first `deft_prompt_length` tokens are the prompt, later ones were generated.
                Methods that decide from the prompt (FastV's last query, Recoverable's question) use only
                the prompt, so a full-recompute forward over prompt + generated tokens decides as the prefill
                did. Default: the whole input. `generate` passes it on (`deft_generation_state`).
            deft_layer_gather_index: FastV decoding steps: the prefill's `deft_generation_state` entry.

        When visual tokens are present and compression is on, `position_ids` is computed here from
        `attention_mask` (original layout, gaps kept) unless `deft_keep_original_positions=False`.

        The cache may be passed as `cache` (transformers >= 5.24) or `past_key_values` (earlier releases).
        """
        past_key_values = resolve_cache_argument(cache, past_key_values)
        self._apply_config()
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if (
            pixel_values is not None
            and mm_encoder_outputs is not None
            and mm_encoder_outputs.get("image") is not None
        ):
            raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
        if (
            pixel_values_videos is not None
            and mm_encoder_outputs is not None
            and mm_encoder_outputs.get("video") is not None
        ):  # the LLaVA video models' wording (stock LLaVA takes no video)
            raise ValueError(
                "You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time"
            )
        mm_encoder_outputs = dict(mm_encoder_outputs) if mm_encoder_outputs is not None else {}
        if mm_encoder_outputs.get("image") is None and pixel_values is not None:
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
                vision_feature_layer,
                vision_feature_select_strategy,
                image_sizes=image_sizes,
                token_gradients=deft_token_gradients,
            )
        if mm_encoder_outputs.get("video") is None and pixel_values_videos is not None:
            if self.config.video_token_index is None:
                raise ValueError("pixel_values_videos was given but config.video_token_index is None")
            mm_encoder_outputs["video"] = self.get_video_features(
                pixel_values_videos, vision_feature_layer, vision_feature_select_strategy
            )
        image_out, video_out = mm_encoder_outputs.get("image"), mm_encoder_outputs.get("video")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if image_out is None and video_out is None:
            return self._continue(
                inputs_embeds,
                attention_mask,
                position_ids,
                past_key_values,
                kwargs,
                deft_prompt_length,
                deft_layer_gather_index,
            )
        batch, seq = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        prompt_length = seq if deft_prompt_length is None else int(deft_prompt_length)
        if attention_mask is not None and attention_mask.dim() != 2:
            self._refuse_4d_mask(attention_mask)
            valid = torch.ones(batch, seq, dtype=torch.bool, device=device)  # compression off: unused
        else:
            valid = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(batch, seq, dtype=torch.bool, device=device)
            )
        stage = self.compression_stage
        image_mask = None
        if image_out is not None:
            image_mask = self._placeholder_mask(input_ids, inputs_embeds, self.config.image_token_index)
        if image_out is not None and stage == "features_with_text" and image_out.pooler_output:
            text = valid & ~image_mask
            if self.config.video_token_index is not None:
                text &= ~self._placeholder_mask(input_ids, inputs_embeds, self.config.video_token_index)
            image_out = self._compress_with_text(image_out, image_mask, text, inputs_embeds, prompt_length)
        visual = torch.zeros(batch, seq, dtype=torch.bool, device=device)
        advance = valid.long()  # text tokens move the counter by 1, padding by 0
        source_index = torch.zeros(batch, seq, dtype=torch.long, device=device)
        keep = None
        num_reconstructed = None
        kept_indices = []
        for modality, out, token_id in (
            ("image", image_out, self.config.image_token_index),
            ("video", video_out, self.config.video_token_index),
        ):
            if out is None:
                continue
            inputs_embeds, mask, adv, src, kp, from_rtd, kept = self._place(
                modality, out, input_ids, inputs_embeds, token_id, deft_reconstruct
            )
            kept_indices += kept
            if from_rtd is not None:
                count = from_rtd.sum(1)
                num_reconstructed = count if num_reconstructed is None else num_reconstructed + count
            visual |= mask
            advance = torch.where(mask, adv, advance)
            source_index = source_index + src
            if kp is not None:
                keep = kp if keep is None else keep & kp
        if self.compression_active and self.config.deft_keep_original_positions:
            position_ids = original_position_ids(valid, visual, source_index, advance)
            if attention_mask is None:
                # without a mask (and without a cache) transformers reads every position gap as the start of a
                # new packed sequence and blocks attention across it: hand the language model an explicit mask
                attention_mask = valid.long()
        renumber = self.compression_active and not self.config.deft_keep_original_positions
        if renumber and position_ids is None:
            position_ids = (valid.long().cumsum(1) - 1).masked_fill(~valid, 0)
        gather_index = compact_mask = None
        if keep is not None and not bool(keep[valid].all()):
            gather_index, compact_mask = repack_left(keep & valid)
            inputs_embeds = gather_seq(inputs_embeds, gather_index, 0.0)
            position_ids = gather_seq(position_ids, gather_index, 0)
            attention_mask = compact_mask
            if renumber:  # contiguous over the tokens the language model sees, not over all N placeholders
                # (also when generate passed positions: it numbered all N placeholders)
                kept = compact_mask.bool()
                position_ids = (kept.long().cumsum(1) - 1).masked_fill(~kept, 0)
        visual_items = None
        if stage == "language_model" and image_mask is not None and image_out.pooler_output:
            n = image_out.pooler_output[0].shape[0]
            visual_items = scatter_rows(
                image_mask, torch.arange(int(image_mask.sum()), device=device) // n, fill=-1
            )
        outputs = self._language_model_forward(
            inputs_embeds,
            attention_mask,
            position_ids,
            past_key_values,
            kwargs,
            visual_items=visual_items,
            prompt_length=prompt_length,
            layer_gather_index=deft_layer_gather_index,
        )
        if visual_items is not None and outputs.deft_kept_indices is not None:
            # FastV: the language model decided which visual tokens the later layers keep
            layer_keep = outputs.deft_kept_indices  # (batch, seq) bool, see _language_model_forward
            per_image = layer_keep[image_mask].view(-1, n)  # (images, N)
            sources = source_index[image_mask].view(-1, n)  # (images, N)
            kept_indices = [src[k] for src, k in zip(sources, per_image)]
            outputs.deft_compression_scores = outputs.deft_compression_scores[image_mask].view(-1, n)
        state = dict(outputs.deft_generation_state or {})
        if stage in ("features_with_text", "language_model"):
            state["deft_prompt_length"] = prompt_length  # later steps decide on the same prompt
        outputs.deft_generation_state = state or None
        record_cache_state(
            cache_of(outputs),
            position_ids,
            valid if gather_index is None else compact_mask.bool(),
            generation_state=state,
            repacked=gather_index is not None,
            gaps=self.compression_active and self.config.deft_keep_original_positions,
        )
        for key, value in visual_output_fields(image_out, video_out).items():
            setattr(outputs, key, value)
        outputs.deft_position_ids = position_ids
        outputs.deft_attention_mask = compact_mask
        outputs.deft_gather_index = gather_index
        outputs.image_features_output = image_out
        outputs.video_features_output = video_out
        outputs.deft_kept_indices = kept_indices
        outputs.deft_num_reconstructed = num_reconstructed
        return outputs

    def _continue(
        self, inputs_embeds, attention_mask, position_ids, cache, kwargs, prompt_length, layer_gather_index
    ):
        """A forward without visual inputs: decoding steps, or a later turn that reuses a cache.

        A cache this model wrote carries what the next call needs (`cache_state.py`): new tokens continue the
        cached positions (gaps of the kept original positions included, whatever `position_ids` a caller
        derived from the attention mask), and prompt-dependent methods get the prompt length and FastV's layer
        gather index of the prefill that filled the cache.

        Raises:
            ValueError: the cache was re-packed (`hybrid`/`adaptive`, Recoverable) and the attention mask does
                not describe the cached tokens (a later turn with the uncompressed history).
        """
        state = read_cache_state(cache)
        batch, seq = inputs_embeds.shape[:2]
        new_valid = torch.ones(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            new_valid = attention_mask[:, -seq:].bool()
        if state is not None:
            expected = None
            if state.get("next_position") is not None:
                expected = continued_position_ids(state, new_valid)
            if state.get("repacked") and not (
                expected is not None
                and position_ids is not None
                and torch.equal(position_ids.masked_fill(~new_valid, 0), expected)
            ):
                # only generate's own decoding steps (which get the compacted mask and the kept positions from
                # `_update_model_kwargs_for_generation`) can extend a re-packed cache
                raise ValueError(
                    f"this cache holds {cache.get_seq_length()} re-packed tokens (deft_inference_mode "
                    f"{self.config.deft_inference_mode!r} or compression_method "
                    f"{self.config.compression_method!r} dropped placeholders), so a later turn cannot reuse it: "
                    "the input ids and the attention mask no longer line up with it; call generate with the "
                    "whole conversation and its images, without past_key_values (or use deft_inference_mode="
                    "'fast', whose caches can be continued)"
                )
            generation = state.get("generation_state") or {}
            if prompt_length is None:
                prompt_length = generation.get("deft_prompt_length")
            if layer_gather_index is None:
                layer_gather_index = generation.get("deft_layer_gather_index")
            if expected is not None:
                position_ids = expected
        outputs = self._language_model_forward(
            inputs_embeds,
            attention_mask,
            position_ids,
            cache,
            kwargs,
            prompt_length=prompt_length,
            layer_gather_index=layer_gather_index,
        )
        if state is not None:
            record_cache_state(cache_of(outputs), position_ids, new_valid)
        return outputs

    def _refuse_4d_mask(self, attention_mask: torch.Tensor) -> None:
        """A 4-D attention mask passes through to the language model only when compression is off: compression
        needs the 2-D padding mask (original positions, re-packing, in-LLM pruning). `generate` keeps the 2-D
        mask for this model (`create_masks_for_generate`)."""
        if self.compression_active:
            raise ValueError(
                f"attention_mask of shape {tuple(attention_mask.shape)}: with use_deft=True the model needs the "
                "2-D (batch, sequence) padding mask (1 = token, 0 = padding) and builds the attention masks itself"
            )

    def _language_model_forward(
        self,
        inputs_embeds,
        attention_mask,
        position_ids,
        past_key_values,
        kwargs,
        visual_items=None,
        prompt_length=None,
        layer_gather_index=None,
    ):
        """The language model; a `"language_model"` method (FastV, FiCoCo-L) runs its layers itself.

        For such a method the output's `deft_kept_indices` is temporarily the `(batch, seq)` bool of tokens
        the later layers kept and `deft_compression_scores` its `(batch, seq)` ranking (`forward` splits
        them per image)."""
        if self.compression_stage == "language_model":
            if attention_mask is not None and attention_mask.dim() != 2:
                self._refuse_4d_mask(attention_mask)
            asked = [
                key
                for key in ("output_attentions", "output_hidden_states")
                if (
                    kwargs.get(key)
                    if kwargs.get(key) is not None
                    else getattr(self.config, key, False) or getattr(self.language_model.config, key, False)
                )
            ]
            if asked:  # asked on the call or in the config: refused, never silently dropped
                raise ValueError(
                    f"{self.compressor.name} runs the decoder layers itself and does not return {asked}; "
                    f"set them to False (on the call and in the config) or use another compression_method"
                )
            if position_ids is None:
                past = past_key_values.get_seq_length() if past_key_values is not None else 0
                position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past
                position_ids = position_ids.unsqueeze(0).expand(inputs_embeds.shape[0], -1)
            n = None
            if visual_items is not None:
                n = int((visual_items == 0).sum())  # tokens per image
            run = self.compressor.run_language_model(
                self.language_model,
                inputs_embeds,
                attention_mask,
                position_ids,
                past_key_values=past_key_values,
                # like the stock language model: an explicit use_cache, else the config's (a cache passed in
                # is always extended)
                use_cache=kwargs.get("use_cache")
                if kwargs.get("use_cache") is not None
                else (past_key_values is not None or bool(self.language_model.config.use_cache)),
                visual_items=visual_items,
                num_kept=num_kept_tokens(n, self.config.deft_retention_ratio) if n else 1,
                prompt_length=prompt_length,
                layer_gather_index=layer_gather_index,
            )
            state = None
            if run.layer_gather_index is not None and run.past_key_values is not None:
                state = {"deft_layer_gather_index": run.layer_gather_index}
            return DeftLlavaModelOutputWithPast(
                last_hidden_state=run.last_hidden_state,
                **cache_kwargs(run.past_key_values),
                deft_kept_indices=run.keep,
                deft_compression_scores=run.scores,
                deft_generation_state=state,
            )
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            **cache_kwargs(past_key_values),
            **kwargs,
        )
        return DeftLlavaModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **cache_kwargs(cache_of(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class DeftLlavaForConditionalGeneration(DeftLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA with DeFT compression in its forward pass, for `generate`, `pipeline` and `Trainer`.

    With `use_deft=False` it computes exactly what `LlavaForConditionalGeneration` computes.

    `adaptive` mode (prefill with visual tokens): a fast prefill; the next-token distribution of each sample's
    last position is checked with the RTD rule (normalised entropy > `deft_rtd_entropy_threshold` or max
    probability < `deft_rtd_confidence_threshold`); if any sample is uncertain, the prefill runs again with
    the RTD-reconstructed tokens added for those samples (the cache is reset first).
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
        deft_layer_gather_index: torch.LongTensor | None = None,
        deft_num_images_in_batch: int | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> DeftLlavaCausalLMOutputWithPast:
        r"""LLaVA forward with compression. `deft_token_gradients`, `deft_prompt_length`,
        `deft_layer_gather_index`: see `DeftLlavaModel.forward`. The cache may be passed as `cache`
        (transformers >= 5.24) or `past_key_values` (earlier releases).

        Training loss (`self.training`): `lm_loss + deft_rtd_loss_weight * rtd_loss + deft_feedback_loss_weight *
        feedback_loss`. For a batch split into micro-batches (gradient accumulation, several processes), pass
        `num_items_in_batch` (answer tokens of the whole batch: `lm_loss` becomes this call's token sum over it)
        and `deft_num_images_in_batch` (images of the whole batch, a video counting as one): the DeFT terms, means
        over this call's images, are weighted by this call's share of them, so the micro-batches' losses add up
        to the whole batch's loss. `DeftLlavaTrainer` passes both."""
        past_key_values = resolve_cache_argument(cache, past_key_values)
        mm_encoder_outputs = dict(mm_encoder_outputs) if mm_encoder_outputs is not None else {}
        adaptive = (
            self.config.use_deft
            and self.config.compression_method == DEFT_METHOD
            and self.config.deft_inference_mode == "adaptive"
        )
        if adaptive:  # encode once, use twice
            if pixel_values is not None and mm_encoder_outputs.get("image") is not None:
                raise ValueError(
                    "You cannot specify both pixel_values and mm_encoder_outputs at the same time"
                )  # stock's wording (the inner forward refuses the same)
            if pixel_values is not None and mm_encoder_outputs.get("image") is None:
                mm_encoder_outputs["image"] = self.model.get_image_features(
                    pixel_values,
                    vision_feature_layer,
                    vision_feature_select_strategy,
                    image_sizes=image_sizes,
                )
            if pixel_values_videos is not None and mm_encoder_outputs.get("video") is None:
                mm_encoder_outputs["video"] = self.model.get_video_features(
                    pixel_values_videos, vision_feature_layer, vision_feature_select_strategy
                )
            pixel_values = pixel_values_videos = None
        model_kwargs = dict(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_sizes=image_sizes,
            mm_encoder_outputs=mm_encoder_outputs,
            pixel_values_videos=pixel_values_videos,
            deft_token_gradients=deft_token_gradients,
            deft_prompt_length=deft_prompt_length,
            deft_layer_gather_index=deft_layer_gather_index,
        )
        cached_before = past_key_values.get_seq_length() if past_key_values is not None else 0
        outputs = self.model(**model_kwargs, **kwargs)
        has_visual = outputs.image_features_output is not None or outputs.video_features_output is not None
        reconstructed = None
        if adaptive and has_visual:
            last_logits = self.lm_head(outputs.last_hidden_state[:, -1])  # (batch, vocab)
            reconstructed = sample_is_uncertain(
                last_logits, self.config.deft_rtd_entropy_threshold, self.config.deft_rtd_confidence_threshold
            )
            if bool(reconstructed.any()):
                if past_key_values is not None:  # earlier turns stay, this prefill is dropped
                    rewind_cache(past_key_values, cached_before)
                outputs = self.model(**model_kwargs, deft_reconstruct=reconstructed, **kwargs)

        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        lm_loss = loss = None
        if labels is not None:
            if outputs.deft_gather_index is not None:
                labels = gather_seq(labels, outputs.deft_gather_index.to(labels.device), -100)
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = lm_loss
        feats = [o for o in (outputs.image_features_output, outputs.video_features_output) if o is not None]
        rtd_source = next((o for o in feats if o.rtd_loss is not None), None)
        feedback_source = next((o for o in feats if o.feedback_loss is not None), None)
        rtd_loss = rtd_source.rtd_loss if rtd_source is not None else None
        feedback_loss = feedback_source.feedback_loss if feedback_source is not None else None
        # total training loss: lm + deft_rtd_loss_weight * rtd + deft_feedback_loss_weight * feedback
        if loss is not None and self.training:
            if rtd_loss is not None:
                share = batch_share(rtd_source, deft_num_images_in_batch)
                loss = loss + self.config.deft_rtd_loss_weight * share * rtd_loss
            if feedback_loss is not None:
                share = batch_share(feedback_source, deft_num_images_in_batch)
                loss = loss + self.config.deft_feedback_loss_weight * share * feedback_loss
        return DeftLlavaCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_kwargs(cache_of(outputs)),
            **visual_output_fields(outputs.image_features_output, outputs.video_features_output),
            lm_loss=lm_loss,
            rtd_loss=rtd_loss,
            feedback_loss=feedback_loss,
            kept_indices=outputs.deft_kept_indices,
            compression_scores=(
                outputs.deft_compression_scores
                if outputs.deft_compression_scores is not None
                else (feats[0].compression_scores if feats else None)
            ),
            mixture_weights=feats[0].mixture_weights if feats else None,
            num_reconstructed=outputs.deft_num_reconstructed,
            deft_position_ids=outputs.deft_position_ids,
            deft_attention_mask=outputs.deft_attention_mask,
            deft_gather_index=outputs.deft_gather_index,
            deft_generation_state=outputs.deft_generation_state,
        )

    def _update_model_kwargs_for_generation(
        self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1
    ):
        """Hand the prefill's position ids (gaps kept), compacted mask and `deft_generation_state` (the prompt
        length a prompt-dependent method decided on, FastV's layer gather index) back to `generate`."""
        for key, value in (getattr(outputs, "deft_generation_state", None) or {}).items():
            if model_kwargs.get(key) is None:  # the prefill's value holds for the whole generation
                model_kwargs[key] = value
        positions = getattr(outputs, "deft_position_ids", None)
        if positions is not None and cache_of(outputs) is not None:
            model_kwargs["position_ids"] = positions
            if outputs.deft_attention_mask is not None:
                model_kwargs["attention_mask"] = outputs.deft_attention_mask
        return super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )

    def _expand_multimodal_outputs(self, input_ids, mm_encoder_output, expand_size=1, inputs_embeds=None):
        """Beam search / `num_return_sequences`: expand the compression bookkeeping with the features.

        The parent method regroups `pooler_output` per sample; we tag every item with its index, let the
        parent regroup the tags, and apply the same order to every per-item field."""
        order = {}
        originals = {}
        for modality, out in mm_encoder_output.items():
            if isinstance(out, DeftVisualFeaturesOutput):
                originals[modality] = out
                tags = [torch.full((len(r), 1), i, dtype=torch.long) for i, r in enumerate(out.pooler_output)]
                mm_encoder_output[modality] = BaseModelOutputWithPooling(pooler_output=tags)
        expanded = super()._expand_multimodal_outputs(
            input_ids, mm_encoder_output, expand_size, inputs_embeds
        )
        for modality, out in originals.items():
            order[modality] = [int(t[0, 0]) for t in expanded[modality].pooler_output]
            idx = order[modality]
            out.pooler_output = [out.pooler_output[i] for i in idx]
            out.source_indices = [out.source_indices[i] for i in idx]
            out.num_source_tokens = [out.num_source_tokens[i] for i in idx]
            if out.row_keep is not None:
                out.row_keep = [out.row_keep[i] for i in idx]
                out.row_fast = [out.row_fast[i] for i in idx]
            if out.compression_scores is not None:
                out.compression_scores = out.compression_scores[idx]
            if out.num_reconstructed is not None:
                out.num_reconstructed = out.num_reconstructed[idx]
            if out.cls_embeddings is not None:
                out.cls_embeddings = out.cls_embeddings[idx]
            if out.cls_attention is not None:
                out.cls_attention = out.cls_attention[idx]
            expanded[modality] = out
        return expanded


__all__ = [
    "DeftLlavaForConditionalGeneration",
    "DeftLlavaModel",
    "DeftLlavaPreTrainedModel",
    "DeftLlavaCausalLMOutputWithPast",
    "DeftVisualFeaturesOutput",
]
