"""`DeftLlavaVllmForConditionalGeneration`: DeFT-LLaVA as a vLLM model (vision tower, projector, DeFT scorer in
fast mode, then vLLM's paged-attention language model), with the original position ids of the kept tokens.

Follows vLLM's `LlavaForConditionalGeneration` (`vllm/model_executor/models/llava.py`), rebuilt from the same vLLM
parts rather than subclassed (that file imports vLLM's Pixtral support, which needs a `torchvision` that loads
with the CPU torch; see `vllm_processing.py`): vLLM's CLIP/SigLIP tower (up to the feature layer, no post
layer norm), a projector of vLLM's parallel linear layers, vLLM's registered language model for the text config,
and vLLM's weight loader with the same checkpoint name mapping. Differences:

1. Compression (`embed_multimodal`): after the projector, the seed's `DeFTModule` scores the N patch tokens of
   every image and keeps the top K = `config.num_kept_tokens(N)` in their original order (DeFT "fast" mode: a
   fixed K per image, so vLLM's placeholder accounting, KV-cache reservation and scheduling hold; the processor,
   `vllm_processing.py`, writes K placeholders). Its weights load from the checkpoint's `model.deft.*`.
2. Positions. DeFT-LLaVA in transformers gives each kept token its ORIGINAL position id (the patch index after
   the image's start) and lets the text after an image resume where the full image would have ended. vLLM
   numbers placeholders contiguously, so both are restored here with two official vLLM mechanisms:
   - the text after an image, and every decoding step, through vLLM's M-RoPE position interface
     (`SupportsMRoPE.get_mrope_input_positions`: per-prompt positions plus a decoding delta; used by Qwen2-VL).
     The plugin's config (`vllm_plugin.DeftLlavaVllmConfig`) declares an M-RoPE section that puts every rotary
     frequency on the first position row, so the rotation equals the standard RoPE of the checkpoint;
   - the kept token's own offset inside its image (`kept_index - j` for the j-th kept token) travels with its
     embedding as two extra channels, is stripped in `embed_input_ids` and added to the positions in `forward`
     (the way vLLM's Qwen3-VL passes deepstack embeddings from `embed_input_ids` to `forward`, and its EVS video
     pruning carries positions as extra embedding channels).
   `deft_keep_original_positions=False` numbers everything contiguously instead (as vLLM's LLaVA does).
3. Refused at start-up with a `ValueError` naming the setting: methods whose count changes per sample (DeFT
   `deft_inference_mode` `hybrid`/`adaptive`) or that work inside the language model or need the prompt's text
   (every baseline `compression_method` other than `"deft"` is refused in this version), and precomputed
   `image_embeds` inputs (they would bypass compression); Pixtral towers, LoRA and pipeline parallelism are not
   offered.

Shapes: `embed_multimodal` returns, per image, `(K, hidden_size + 2)`; `embed_input_ids` returns
`(num_tokens, hidden_size)`; `forward` takes `positions` `(num_tokens,)` or `(3, num_tokens)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn
from transformers import CLIPVisionConfig, SiglipVisionConfig
from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMRoPE, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_layer_index,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from modeling_deft_llava import DeFTModule
from modeling_deft_llava.compressors.compression_method import CompressionMethod
from modeling_deft_llava.compressors.compression_registry import METHODS, build_method, method_class
from modeling_deft_llava.compressors.method_deft import DeftLlavaDeFTCompressor
from modeling_deft_llava.compressors.token_compressor import CompressionContext, TokenCompressor
from modeling_deft_llava.compressors.vision_attention import cls_attention, patch_keys

from .vllm_processing import (
    DeftLlavaVllmDummyInputsBuilder,
    DeftLlavaVllmMultiModalProcessor,
    DeftLlavaVllmProcessingInfo,
    num_source_tokens,
)

# the kept token's offset inside its image travels as two embedding channels (low, high) of base OFFSET_BASE:
# each channel stays below 64, exact in bf16/fp16, for offsets up to 64 * 64 = 4096 patches per image
OFFSET_BASE = 64
OFFSET_CHANNELS = 2


# the hooks a method may override that vLLM's plugin does not run, and why (see `fixed_k_refusal`)
UNSERVED_HOOKS = {
    "encode_images": "it runs inside the vision encoder's layers, and vLLM runs its own CLIP/SigLIP tower unchanged",
    "compress_with_prompt": "it reads the prompt's text, and vLLM encodes images (embed_multimodal) without it",
    "run_language_model": "it prunes or merges inside the language model's layers, which vLLM runs (paged "
    "attention, a KV cache reserved per placeholder)",
    "reconsider": "it asks for a second prefill with more tokens, which vLLM's scheduler does not offer",
}


def fixed_k_refusal(method: type[CompressionMethod], config) -> str | None:
    """Why the baseline `method` cannot run in the plugin with `config`, or None when it can: it must keep a fixed
    K per image from the vision features or the projected features alone, before the language model (a
    `TokenCompressor` that overrides none of `UNSERVED_HOOKS`, reads no text, and writes K placeholders)."""
    for hook, reason in UNSERVED_HOOKS.items():
        if getattr(method, hook) is not getattr(CompressionMethod, hook):
            return reason
    if method.needs_text:
        return UNSERVED_HOOKS["compress_with_prompt"]
    if not issubclass(method, TokenCompressor) or method.compress is TokenCompressor.compress:
        return "it does not compress one image's features on its own (a TokenCompressor)"
    if method.writes_all_placeholders(config):
        return (
            "with these compression_settings it decides the number of tokens per image inside the forward pass "
            f"({config.compression_settings!r}), and vLLM's placeholder accounting needs a fixed K per image"
        )
    return None


def served_methods() -> list[str]:
    """The `compression_method` names the plugin serves (with their default settings): DeFT (fast mode) and the
    fixed-K baselines."""
    defaults = SimpleNamespace(
        compression_settings=None, deft_inference_mode="fast", deft_retention_ratio=0.25
    )
    return [
        name
        for name, cls in METHODS.items()
        if name == DeftLlavaDeFTCompressor.name or fixed_k_refusal(cls, defaults) is None
    ]


def serving_refusal(config) -> str | None:
    """Why vLLM cannot serve this configuration (None: it can). Fixed K per image and compression before the
    language model are required; see the module docstring."""
    if not config.use_deft:
        return None
    if config.compression_method != DeftLlavaDeFTCompressor.name:
        reason = fixed_k_refusal(method_class(config.compression_method), config)
        if reason is None:
            return None
        return (
            f"compression_method={config.compression_method!r} is not served by the DeFT-LLaVA vLLM plugin: "
            f"{reason}. Served: {served_methods()} (a fixed K per image, chosen before the language model), or "
            "use_deft=False. Serve this method with transformers' generate, or pass "
            "hf_overrides={'compression_method': ...} with a served one"
        )
    if config.deft_inference_mode != "fast":
        return (
            f"deft_inference_mode={config.deft_inference_mode!r} keeps a content-dependent number of tokens per "
            "image, which vLLM's placeholder accounting cannot hold; set deft_inference_mode='fast' (a fixed "
            "K per image) in config.json, or pass hf_overrides={'deft_inference_mode': 'fast'}"
        )
    if getattr(config, "deft_question_aware", False):
        return (
            "deft_question_aware=True selects each image's tokens with the prompt's question, but vLLM encodes "
            "images (embed_multimodal) without the prompt's text and this plugin does not pass it. Serve this "
            "folder with transformers' generate (or serving/handler.py), or serve it question-blind with "
            "hf_overrides={'deft_question_aware': False} (the question encoder's weights are then ignored and the "
            "scorer ranks without the question: lower accuracy, see the model card)"
        )
    return None


class _FeatureLayerView:
    """vLLM's CLIP encoder layer seen through the names `vision_attention.cls_attention` / `patch_keys` read
    (`layer_norm1`, `self_attn.q_proj/k_proj/num_heads/head_dim/scale`): vLLM fuses q, k and v into one
    `qkv_proj`, whose output is `[q | k | v]`. The same statistics as transformers' layer, so a baseline ranks
    the same patches as in `generate`."""

    def __init__(self, layer: nn.Module):
        attn = layer.self_attn
        heads = attn.num_heads_per_partition
        width = heads * attn.head_dim
        self.layer_norm1 = layer.layer_norm1

        def q_proj(states):
            return attn.qkv_proj(states)[0][..., :width]

        def k_proj(states):
            return attn.qkv_proj(states)[0][..., width : 2 * width]

        self.self_attn = SimpleNamespace(
            q_proj=q_proj, k_proj=k_proj, num_heads=heads, head_dim=attn.head_dim, scale=attn.scale
        )


def build_deft_module(config) -> DeFTModule:
    """The DeFT method with the checkpoint's DeFT settings, built as the transformers model builds it
    (`DeftLlavaDeFTCompressor.from_config`: a `DeFTModule` whose weights are `model.deft.*`); the plugin calls
    it on the projected features in "fast" mode. Checked by the vLLM-equals-generate test."""
    return DeftLlavaDeFTCompressor.from_config(config)


class DeftLlavaVllmProjector(nn.Module):
    """LLaVA's two-layer projector, `(..., vision_hidden)` -> `(..., text_hidden)`, on vLLM's parallel linears
    (checkpoint names `multi_modal_projector.linear_1` / `linear_2`, as transformers' `LlavaMultiModalProjector`)."""

    def __init__(self, config, quant_config=None, prefix: str = ""):
        super().__init__()
        hidden, bias = config.text_config.hidden_size, config.multimodal_projector_bias
        self.linear_1 = ColumnParallelLinear(
            config.vision_config.hidden_size,
            hidden,
            bias=bias,
            quant_config=quant_config,
            prefix=f"{prefix}.linear_1",
        )
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(
            hidden, hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_2"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


def build_vision_tower(config, quant_config=None, prefix: str = "") -> nn.Module:
    """vLLM's CLIP or SigLIP tower, built up to the feature layer (`vision_feature_layer`, an int)."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"vision_feature_layer must be one layer (an int) for vLLM serving, got {layer!r}")
    vision = config.vision_config
    kwargs = dict(
        quant_config=quant_config,
        num_hidden_layers_override=get_layer_index(layer, vision.num_hidden_layers),
        require_post_norm=False,
        prefix=prefix,
    )
    if isinstance(vision, CLIPVisionConfig):
        return CLIPVisionModel(vision, **kwargs)
    if isinstance(vision, SiglipVisionConfig):
        return SiglipVisionModel(vision, **kwargs)
    raise ValueError(
        f"vision tower {type(vision).__name__} is not served by the DeFT-LLaVA vLLM plugin (CLIP, SigLIP)"
    )


@MULTIMODAL_REGISTRY.register_processor(
    DeftLlavaVllmMultiModalProcessor,
    info=DeftLlavaVllmProcessingInfo,
    dummy_inputs=DeftLlavaVllmDummyInputsBuilder,
)
class DeftLlavaVllmForConditionalGeneration(nn.Module, SupportsMultiModal, SupportsMRoPE):
    """vLLM's LLaVA with DeFT compression and original position ids (see the module docstring).

    Raises:
        ValueError: at construction (vLLM start-up), a configuration vLLM cannot serve (`serving_refusal`);
            at run time, precomputed `image_embeds`, or a compressor that returned another count than K.
    """

    # checkpoint names: transformers >= 4.52 (`model.` prefix) and older (as vLLM's LLaVA), plus the DeFT stage
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "model.deft.": "deft.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError(f"DeFT-LLaVA in vLLM takes images only, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        refusal = serving_refusal(config)
        if refusal is not None:
            raise ValueError(refusal)
        super().__init__()
        self.config = config
        quant_config = vllm_config.quant_config
        self.configure_mm_token_handling(
            vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_index]
        )
        self.compress = bool(config.use_deft)
        self.keep_original_positions = bool(config.deft_keep_original_positions) and self.compress
        self.num_source_tokens = num_source_tokens(config)
        self.num_kept_tokens = config.num_kept_tokens(self.num_source_tokens)
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = build_vision_tower(config, quant_config, maybe_prefix(prefix, "vision_tower"))
            self.multi_modal_projector = DeftLlavaVllmProjector(
                config, quant_config, maybe_prefix(prefix, "multi_modal_projector")
            )
            is_deft = config.compression_method == DeftLlavaDeFTCompressor.name
            self.deft = build_deft_module(config) if self.compress and is_deft else None
            # a fixed-K baseline (`fixed_k_refusal` passed): the registry's method, as the transformers model builds it
            self.compressor = build_method(config) if self.compress and not is_deft else None
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors
        # per-token position offsets of the current step: written by embed_input_ids, read by forward
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens + 1024
        self.register_buffer("position_offsets", torch.zeros(max_tokens, dtype=torch.long), persistent=False)

    # ------------------------------------------------------------------ encoder side
    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """Per image, `(K, hidden_size + 2)`: the kept rows, then their in-image offsets (two channels)."""
        if kwargs.get("image_embeds") is not None:
            raise ValueError(
                "precomputed image_embeds are not accepted by DeFT-LLaVA in vLLM (they would bypass compression); "
                "send the image itself"
            )
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if not isinstance(pixel_values, torch.Tensor):  # one tensor per image: all share the tower's size
            pixel_values = torch.stack(list(pixel_values))
        strategy = self.config.vision_feature_select_strategy
        if self.compressor is not None:  # a fixed-K baseline
            rows, kept, n = self._compress_with_baseline(pixel_values, strategy)
        else:
            features = self.vision_tower(
                pixel_values, feature_select_strategy=strategy
            )  # (images, N, vision)
            features = self.multi_modal_projector(features)  # (images, N, hidden_size)
            images, n, _ = features.shape
            if self.deft is None:  # compression off
                kept = torch.arange(n, device=features.device).expand(images, n)  # (images, N)
                rows = features
            else:
                patch = self.config.vision_config.patch_size
                grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
                out = self.deft(tokens=features, modality="image", spatial_shape=grid, inference_mode="fast")
                rows, kept = out.retained_tokens, out.kept_indices  # (images, K, hidden_size), (images, K)
        if self.compress and rows.shape[1] != self.num_kept_tokens:
            raise ValueError(
                f"compression method {self.config.compression_method!r} kept {rows.shape[1]} tokens per image but "
                f"the processor wrote {self.num_kept_tokens} placeholders (N={n}, ratio "
                f"{self.config.deft_retention_ratio})"
            )
        k = rows.shape[1]
        offsets = kept - torch.arange(k, device=kept.device)  # (images, K) >= 0: kept indices ascend
        if not self.keep_original_positions:
            offsets = torch.zeros_like(offsets)
        codes = torch.stack([offsets % OFFSET_BASE, offsets // OFFSET_BASE], dim=-1)  # (images, K, 2)
        out_rows = torch.cat([rows, codes.to(rows.dtype)], dim=-1)  # (images, K, hidden_size + 2)
        return list(out_rows)

    def _compress_with_baseline(self, pixel_values: torch.Tensor, strategy: str):
        """A fixed-K baseline, run as `DeftLlavaModel` runs it: on the vision features before the projector
        (`feature_space="vision"`: the projector then sees the K kept rows) or on the projected features, with
        the feature layer's CLS attention and keys recomputed from that layer's input when the method needs them.
        Returns `(rows (images, K, hidden_size), kept (images, K), N)`."""
        method = self.compressor
        captured = {}
        hook = None
        if method.needs_vision_layer:
            layer = self.vision_tower.vision_model.encoder.layers[
                -1
            ]  # the feature layer (the tower ends there)

            def keep_input(module, args, kwargs):
                captured["x"] = args[0] if args else kwargs["hidden_states"]  # (images, 1 + N, width)

            hook = layer.register_forward_pre_hook(keep_input, with_kwargs=True)
        try:
            features = self.vision_tower(
                pixel_values, feature_select_strategy=strategy
            )  # (images, N, vision)
        finally:
            if hook is not None:
                hook.remove()
        n = features.shape[1]
        patch = self.config.vision_config.patch_size
        view = _FeatureLayerView(self.vision_tower.vision_model.encoder.layers[-1]) if captured else None
        context = CompressionContext(
            spatial_shape=(pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch),
            num_kept=self.num_kept_tokens,
            cls_attention=cls_attention(view, captured["x"]) if method.needs_cls_attention else None,
            vision_keys=patch_keys(view, captured["x"]) if method.needs_vision_keys else None,
        )
        if method.feature_space == "vision":
            out = method(features, context)  # (images, K, vision)
            return self.multi_modal_projector(out.tokens), out.kept_indices, n
        out = method(self.multi_modal_projector(features), context)
        return out.tokens, out.kept_indices, n

    # ------------------------------------------------------------------ language-model side
    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: MultiModalEmbeddings | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the visual rows scattered in; records each visual token's in-image offset.

        `input_ids`: `(num_tokens,)`; each multimodal embedding `(rows, hidden_size + 2)`. Returns
        `(num_tokens, hidden_size)`."""
        self.position_offsets.zero_()
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            codes = torch.cat([e[:, -OFFSET_CHANNELS:] for e in multimodal_embeddings]).round().long()
            offsets = codes[:, 0] + OFFSET_BASE * codes[:, 1]  # (visual tokens in this step,)
            self.position_offsets[: input_ids.shape[0]][is_multimodal] = offsets
            multimodal_embeddings = [e[:, :-OFFSET_CHANNELS] for e in multimodal_embeddings]
        return SupportsMultiModal.embed_input_ids(
            self, input_ids, multimodal_embeddings, is_multimodal=is_multimodal
        )

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        """vLLM's LLaVA forward with each kept token's position moved to its original patch position."""
        if positions.ndim == 2:  # M-RoPE rows are equal (get_mrope_input_positions); keep one
            positions = positions[0]
        positions = positions + self.position_offsets[: positions.shape[0]]
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loader with `hf_to_vllm_mapper`. transformers 5 saves the tower's weights without the
        `vision_model.` level that vLLM's CLIP/SigLIP modules have (`vision_tower.embeddings...`): it is added."""

        def renamed():
            for name, tensor in weights:
                for head in ("model.vision_tower.", "vision_tower."):
                    if name.startswith(head) and not name.startswith(head + "vision_model."):
                        name = head + "vision_model." + name[len(head) :]
                yield name, tensor

        # compression off (use_deft=False): the checkpoint's DeFT weights are not used; question-blind serving
        # of a question-aware checkpoint (hf_overrides deft_question_aware=False): its question encoder is not
        # a baseline's checkpoint weights (a DeFT checkpoint served with another compression_method): not used
        skip = ["deft."] if self.deft is None else ["deft.question_encoder."]
        loaded = AutoWeightsLoader(self, ignore_unexpected_prefixes=skip).load_weights(
            renamed(), mapper=self.hf_to_vllm_mapper
        )
        # the baselines are built from settings alone (parameter-free): nothing of theirs is in a checkpoint
        return loaded | {
            f"compressor.{name}" for name, _ in (self.compressor or nn.Module()).named_parameters()
        }

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list
    ) -> tuple[torch.Tensor, int]:
        """Prompt positions `(3, len(input_tokens))` (three equal rows) and the decoding delta.

        The text after an image resumes at `image_start + N` (N - K skipped ids per image before it), as in
        transformers' DeFT-LLaVA; each kept token's own offset is added in `forward`."""
        length = len(input_tokens)
        shift = torch.zeros(length, dtype=torch.long)  # (L,) ids skipped before each token
        if self.keep_original_positions:
            for feature in mm_features:
                end = feature.mm_position.offset + feature.mm_position.length
                shift[end:] += self.num_source_tokens - feature.mm_position.length
        positions = torch.arange(length, dtype=torch.long) + shift  # (L,)
        delta = int(shift[-1]) if length else 0
        return positions.unsqueeze(0).expand(3, -1).clone(), delta


__all__ = [
    "DeftLlavaVllmForConditionalGeneration",
    "build_deft_module",
    "fixed_k_refusal",
    "served_methods",
    "serving_refusal",
]
