"""DeFT's stages, one file each, in pipeline order: `semantic_abstraction.py` (SAM) -> `saliency_scorer.py`,
`feedback_scorer.py`, `group_scorer.py`, `score_mixer.py` (FGCS) -> `topk_selector.py` -> `token_dictionary.py`
(RTD); `deft_module.py` assembles them into the seed's `DeFTModule` (`deft_inputs.py`: its input checks).
Modules here import torch and the standard library only.
"""
