"""ToMe inside the CLIP vision encoder: merge r tokens per layer (https://arxiv.org/abs/2210.09461).

Runs the encoder layer by layer itself (embeddings -> `pre_layrnorm` -> layers up to the feature layer) and
merges tokens between each layer's attention and its MLP with `tome_merge.tome_bipartite_merge`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling_outputs_deft_llava import DeftVisualFeaturesOutput
from .compression_method import VisualBatch
from .token_compressor import MethodModule, check_choice
from .tome_merge import tome_bipartite_merge

TOKEN_ORDERS = ("released", "positions")


@dataclass(frozen=True)
class ToMeSettings:
    """Settings of ToMe.

    Args:
        proportional_attention: add `log(size)` of every key to the attention logits once tokens are merged,
            so a token standing for s patches weighs as s copies (the paper's proportional attention, on by
            default in the released code for off-the-shelf models). Passed to the layer as an additive
            attention mask, so SDPA stays on.
        token_order: order of the tokens after each merge, which decides the next layer's alternating A/B
            split and so, from the second merging layer on, which tokens merge. `"released"` (default, the
            official `merge`): `[unmerged A (ascending, CLS first), B]`. `"positions"`: every token keeps
            its place. Either way the encoder's output is put back in the raster order of the
            representative patches, so every output token keeps its original patch's position id. Example,
            CLS + tokens `[-3, -1], [-2, -1], [3, 0], [1, 2]` (CLS `[1, 0]`), two merges of r = 1: released
            groups `{0} {1, 2, 4} {3}`, positions `{0} {1, 2} {3, 4}`.
    """

    proportional_attention: bool = True
    token_order: str = "released"

    def __post_init__(self):
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(
                f"proportional_attention must be True or False, got {self.proportional_attention!r}"
            )
        check_choice("token_order", self.token_order, TOKEN_ORDERS)


def tome_layers_run(num_layers: int, vision_feature_layer: int) -> int:
    """How many encoder layers produce the feature layer: `hidden_states[l]` is the output of layer l - 1.

    >>> tome_layers_run(24, -2), tome_layers_run(2, -1), tome_layers_run(3, 2)
    (23, 2, 2)
    """
    run = num_layers + 1 + vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer
    if not 0 <= run <= num_layers:
        raise ValueError(
            f"vision_feature_layer={vision_feature_layer} does not name a layer of a {num_layers}-layer encoder"
        )
    return run


def tome_schedule(num_patches: int, num_kept: int, num_layers: int) -> list[int]:
    """Tokens merged in each of `num_layers` layers so that exactly `num_kept` patch tokens remain.

    Rule: ToMe's constant schedule r, made exact. A layer with p patch tokens can merge at most `p // 2`
    (set A is every other token and CLS is protected). Layer i merges `min(c, p_i // 2, still_to_remove)`
    with the smallest cap `c >= ceil((N - K) / layers)` for which the total reaches `N - K`; the cap only
    rises above the even split when the halving bound of later layers requires it (for N=576, K=144 and
    23 layers: c = 19, 22 layers merge 19 and the last 14).

    Raises:
        ValueError: when even merging the most every layer allows cannot reach K (names the smallest K).
    """
    remove = num_patches - num_kept
    if remove < 0 or num_kept < 1:
        raise ValueError(f"num_kept must be in [1, {num_patches}], got {num_kept}")

    def greedy(cap: int) -> list[int]:
        patches, out = num_patches, []
        for _ in range(num_layers):
            r = min(cap, patches // 2, remove - sum(out))
            out.append(r)
            patches -= r
        return out

    if sum(greedy(num_patches)) < remove:
        smallest = num_patches - sum(greedy(num_patches))
        raise ValueError(
            f"tome cannot reach {num_kept} of {num_patches} tokens in {num_layers} encoder layer(s): each layer "
            f"merges at most half its patch tokens, so the smallest reachable count is {smallest}; "
            "raise deft_retention_ratio"
        )
    cap = math.ceil(remove / num_layers) if num_layers else 0
    while sum(greedy(cap)) < remove:
        cap += 1
    return greedy(cap)


@dataclass
class ToMeEncoding:
    """Output of `DeftLlavaToMeCompressor.encode`.

    Args:
        hidden_states: `(batch_size, 1 + K, width)` the feature layer's tokens, CLS first.
        kept_indices: `(batch_size, K)` long, ascending: the representative patch of every merged token.
        sizes: `(batch_size, K)` float32, patches each token stands for (they sum to N per row).
    """

    hidden_states: torch.Tensor
    kept_indices: torch.Tensor
    sizes: torch.Tensor


class DeftLlavaToMeCompressor(MethodModule):
    """ToMe (Bolya et al., ICLR 2023, https://arxiv.org/abs/2210.09461) run inside the CLIP vision encoder.

    In every encoder layer up to the feature layer, after the attention block and before the MLP (where the
    paper merges), the r_i most similar token pairs are merged by bipartite soft matching on the layer's keys
    averaged over heads (size-weighted average; CLS is never merged away). The schedule r_i is
    `tome_schedule`, so the feature layer holds exactly K = `config.num_kept_tokens(N)` patch tokens.

    Representative index: a merged token stands at its destination token, so following destinations back
    through the layers gives the original patch it stands at; the model gives the token that patch's
    position id. Between layers the tokens are in the official `[unmerged A, B]` order (`token_order`); the
    output is put back in raster order of the representative patches.

    Differences from the paper/official code: the schedule is exact rather than a constant r; the merge
    metric is recomputed from the layer's input (`k_proj(layer_norm1(x))`, the same keys the layer uses) so
    that the encoder keeps SDPA attention; the official code has no LLaVA integration, so the output order
    and position ids (representative patches, raster order) are this project's; `token_order="positions"`
    keeps every token in place between layers, which changes the later merges (see `ToMeSettings`).
    """

    name = "tome"
    needs_cls_token = True  # token 0 is protected from merging and dropped after the feature layer
    settings_class = ToMeSettings

    @classmethod
    def check_config(cls, config, settings, num_tokens, num_kept) -> None:
        """The feature layer must be reachable and the budget reachable by the merge schedule."""
        layer = config.vision_feature_layer  # a single int: the CLS-token check ran first
        run = tome_layers_run(config.vision_config.num_hidden_layers, layer)
        cls.check_layers(settings, layer, run)
        if num_tokens is not None and config.use_deft:
            cls(8, settings).schedule(num_tokens, num_kept, run)  # num_kept: K (ToMe writes K placeholders)

    @classmethod
    def check_layers(cls, settings, layer: int, run: int) -> None:
        """Settings that depend on the encoder layers run (FiCoCo-V's start layer)."""

    def encode_images(
        self, pixel_values, visual: VisualBatch, vision_feature_layer, strategy
    ) -> DeftVisualFeaturesOutput:
        """The model's hook: run the encoder layers up to the feature layer with merging (`encode`), then the
        projector on the K patch tokens (CLS dropped).

        Raises:
            ValueError: a list of feature layers or a strategy other than `"default"`.
        """
        layer = vision_feature_layer
        if not isinstance(layer, int) or strategy != "default":
            raise ValueError(
                f"{self.name} needs one int vision_feature_layer and the 'default' strategy, got "
                f"{layer!r} and {strategy!r}"
            )
        vision_model = getattr(visual.vision_tower, "vision_model", visual.vision_tower)
        n = visual.spatial_shape[0] * visual.spatial_shape[1]
        encoded = self.encode(
            vision_model,
            pixel_values.to(visual.vision_tower.dtype),
            tome_layers_run(len(vision_model.encoder.layers), layer),
            visual.num_kept,
        )
        features = visual.projector(encoded.hidden_states[:, 1:])  # (images, K, D), CLS dropped
        return DeftVisualFeaturesOutput(
            last_hidden_state=encoded.hidden_states,
            pooler_output=list(features),
            source_indices=list(encoded.kept_indices),
            num_source_tokens=[n] * features.shape[0],
        )

    def encode(
        self, vision_model: nn.Module, pixel_values: torch.Tensor, layers_run: int, num_kept: int
    ) -> ToMeEncoding:
        """Embed `pixel_values` `(batch, C, H, W)` and run `layers_run` CLIP layers with merging.

        Args:
            vision_model: a `CLIPVisionTransformer` (`embeddings`, `pre_layrnorm`, `encoder.layers`).
            layers_run: encoder layers up to the feature layer (`tome_layers_run`).
            num_kept: K, patch tokens left at the feature layer.
        """
        x = vision_model.pre_layrnorm(vision_model.embeddings(pixel_values))  # (batch, 1 + N, width)
        batch, length, _ = x.shape
        patch = vision_model.config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        schedule = self.schedule(length - 1, num_kept, layers_run)
        index = torch.arange(length, device=x.device).expand(batch, -1)  # (batch, T) original token of each
        size = torch.ones(batch, length, device=x.device)  # (batch, T)
        merged_yet = False
        for layer, r in zip(vision_model.encoder.layers[:layers_run], schedule):
            mask = None
            if self.settings.proportional_attention and merged_yet:
                mask = size.log().to(x.dtype)[:, None, None, :]  # (batch, 1, 1, T) additive, every query
            normed = layer.layer_norm1(x)
            x = x + layer.self_attn(hidden_states=normed, attention_mask=mask)[0]
            if r > 0:
                x, size, kept_positions = self.reduce(layer, x, normed, mask, size, index, r, grid)
                index = index.gather(1, kept_positions)  # (batch, T - r)
                merged_yet = True
            x = x + layer.mlp(layer.layer_norm2(x))
        # back to the raster order of the representative patches (a no-op when tokens kept their places);
        # index 0 is CLS (protected, stays first); patch j is token j + 1
        order = index.argsort(dim=1)  # (batch, 1 + K)
        x = x.gather(1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (batch, 1 + K, width)
        size, index = size.gather(1, order), index.gather(1, order)  # (batch, 1 + K) each
        return ToMeEncoding(hidden_states=x, kept_indices=index[:, 1:] - 1, sizes=size[:, 1:])

    def schedule(self, num_patches: int, num_kept: int, layers_run: int) -> list[int]:
        """Tokens removed after each layer's attention (ToMe's most even schedule)."""
        return tome_schedule(num_patches, num_kept, layers_run)

    def reduce(self, layer, x, normed, mask, size, index, r, grid):
        """Remove `r` tokens from `x` `(batch, T, width)`: bipartite soft matching on the head-averaged keys.

        Returns the new tokens, their sizes and, per row, the positions in `x` of the tokens that remain."""
        attn = layer.self_attn
        keys = attn.k_proj(normed).view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim)
        merged = tome_bipartite_merge(
            x, size, r, metric=keys.mean(dim=2), protect_first=True, order=self.settings.token_order
        )
        return merged.tokens, merged.sizes, merged.kept_positions
