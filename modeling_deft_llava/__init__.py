"""DeFT-LLaVA: LLaVA with DeFT token compression inside the model's forward pass.

Public import path::

    from modeling_deft_llava import DeFTModule, DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor

Layout: `modeling_deft_llava.py` (the model: it calls the compression method's hooks),
`modeling_outputs_deft_llava.py`, `token_layout.py` (placement, positions, re-packing, cache state),
`transformers_compat.py`; `compressors/` (the interface, the registry, one `method_<name>.py` per method,
DeFT included; `placeholder_policy.py`, the placeholders per item and the method checks of a config); `deft/`
(DeFT's stages, one per file, and the seed's `DeFTModule`). The design card's other folders are installed as
sub-packages: `configuration/` -> `modeling_deft_llava.configuration`, `processing/` ->
`modeling_deft_llava.processing`, `training/` -> `modeling_deft_llava.training`, `hub_card/` ->
`modeling_deft_llava.hub_card`, `serving/` -> `modeling_deft_llava.serving`, `utilities/` (atomic writes and
locks, process state: imports nothing of the project) -> `modeling_deft_llava.utilities`, and the top floor
`commands/` (convert, warm_start, visualize, demo: nothing imports it) -> `modeling_deft_llava.commands`.

Importing this package registers the classes with the transformers Auto classes (`model_type="deft_llava"`, and
`"deft_llava_next"` for LLaVA-NeXT: `modeling_deft_llava_next.py`).
"""

# first: a source checkout finds its configuration/ etc.; a torchvision that cannot load is named with its fix
from . import _environment  # noqa: F401  # isort: skip
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration.configuration_deft_llava import DeftLlavaConfig
from .configuration.configuration_deft_llava_next import DeftLlavaNextConfig
from .deft.deft_module import DeFTModule, DeFTOutput
from .modeling_deft_llava import (
    DeftLlavaCausalLMOutputWithPast,
    DeftLlavaForConditionalGeneration,
    DeftLlavaModel,
)
from .modeling_deft_llava_next import DeftLlavaNextForConditionalGeneration, DeftLlavaNextModel
from .processing.processing_deft_llava import DeftLlavaProcessor
from .processing.processing_deft_llava_next import DeftLlavaNextProcessor

AutoConfig.register("deft_llava", DeftLlavaConfig, exist_ok=True)
AutoModel.register(DeftLlavaConfig, DeftLlavaModel, exist_ok=True)
AutoModelForCausalLM.register(DeftLlavaConfig, DeftLlavaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(DeftLlavaConfig, DeftLlavaForConditionalGeneration, exist_ok=True)
AutoProcessor.register(DeftLlavaConfig, DeftLlavaProcessor, exist_ok=True)
# LLaVA-NeXT (AnyRes): `model_type="deft_llava_next"`
AutoConfig.register("deft_llava_next", DeftLlavaNextConfig, exist_ok=True)
AutoModel.register(DeftLlavaNextConfig, DeftLlavaNextModel, exist_ok=True)
AutoModelForCausalLM.register(DeftLlavaNextConfig, DeftLlavaNextForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(
    DeftLlavaNextConfig, DeftLlavaNextForConditionalGeneration, exist_ok=True
)
AutoProcessor.register(DeftLlavaNextConfig, DeftLlavaNextProcessor, exist_ok=True)

__all__ = [
    "DeFTModule",
    "DeFTOutput",
    "DeftLlavaConfig",
    "DeftLlavaCausalLMOutputWithPast",
    "DeftLlavaForConditionalGeneration",
    "DeftLlavaModel",
    "DeftLlavaNextConfig",
    "DeftLlavaNextForConditionalGeneration",
    "DeftLlavaNextModel",
    "DeftLlavaNextProcessor",
    "DeftLlavaProcessor",
]
