"""DeFT-LLaVA: LLaVA with DeFT token compression inside the model's forward pass.

Public import path::

    from modeling_deft_llava import DeFTModule, DeftLlavaConfig, DeftLlavaForConditionalGeneration, DeftLlavaProcessor

This folder holds the model code and one file per compression stage:
`semantic_abstraction.py` (SAM) -> `saliency_scorer.py`, `feedback_scorer.py`, `group_scorer.py`,
`score_mixer.py` (FGCS) -> `topk_selector.py` -> `token_dictionary.py` (RTD); `deft_module.py` assembles them
into the seed's `DeFTModule`. The design card's other folders are installed as sub-packages:
`configuration/` -> `modeling_deft_llava.configuration`, `processing/` -> `modeling_deft_llava.processing`,
`training/` -> `modeling_deft_llava.training`, `hub_card/` -> `modeling_deft_llava.hub_card`.
"""

from .deft_module import DeFTModule, DeFTOutput

__all__ = ["DeFTModule", "DeFTOutput"]
