"""DeFT-LLaVA: LLaVA with DeFT token compression inside the model's forward pass.

Public import path::

    from modeling_deft_llava import DeFTModule, DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor

This folder holds the model code and one file per compression stage:
`semantic_abstraction.py` (SAM) -> `saliency_scorer.py`, `feedback_scorer.py`, `group_scorer.py`,
`score_mixer.py` (FGCS) -> `topk_selector.py` -> `token_dictionary.py` (RTD); `deft_module.py` assembles them
into the seed's `DeFTModule`; `modeling_deft_llava.py` puts them in the LLaVA forward pass. The design card's
other folders are installed as sub-packages: `configuration/` -> `modeling_deft_llava.configuration`,
`processing/` -> `modeling_deft_llava.processing`, `training/` -> `modeling_deft_llava.training`,
`hub_card/` -> `modeling_deft_llava.hub_card`.

Importing this package registers the classes with the transformers Auto classes (`model_type="deft_llava"`).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration.configuration_deft_llava import DeftLlavaConfig
from .deft.deft_module import DeFTModule, DeFTOutput
from .modeling_deft_llava import (
    DeftLlavaCausalLMOutputWithPast,
    DeftLlavaForConditionalGeneration,
    DeftLlavaModel,
)
from .processing.processing_deft_llava import DeftLlavaProcessor

AutoConfig.register("deft_llava", DeftLlavaConfig, exist_ok=True)
AutoModel.register(DeftLlavaConfig, DeftLlavaModel, exist_ok=True)
AutoModelForCausalLM.register(DeftLlavaConfig, DeftLlavaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(DeftLlavaConfig, DeftLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(DeftLlavaConfig, DeftLlavaProcessor, exist_ok=True)

__all__ = [
    "DeFTModule",
    "DeFTOutput",
    "DeftLlavaConfig",
    "DeftLlavaCausalLMOutputWithPast",
    "DeftLlavaForConditionalGeneration",
    "DeftLlavaModel",
    "DeftLlavaProcessor",
]
