"""lmms-eval's entry point for DeFT-LLaVA (`[project.entry-points."lmms_eval.models"]` in pyproject.toml).

lmms-eval (0.7) reads the `lmms_eval.models` entry-point group when its model registry starts
(`lmms_eval/models/registry_v2.py`, `load_entrypoint_manifests`): each entry is a `ModelManifest` or a callable
returning one. `manifest()` names the class by import path, so lmms-eval imports the model module (and torch's
model code) only when `--model deft_llava` is asked for.
"""

from __future__ import annotations

MODEL_ID = "deft_llava"
CLASS_PATH = "modeling_deft_llava.evaluation.lmms_eval_model.DeftLlavaLmmsEval"


def manifest():
    """The `ModelManifest` of `deft_llava` (a "simple" lmms-eval model: `generate_until` on raw contexts)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
