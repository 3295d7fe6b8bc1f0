"""Evaluating DeFT-LLaVA with outside frameworks (installed as `modeling_deft_llava.evaluation`).

- `lmms_eval_model.py`: the `deft_llava` model of lmms-eval (`pip install .[lmms-eval]`; registered through
  lmms-eval's `lmms_eval.models` entry-point group, `lmms_eval_plugin.manifest`).
- `digits_task.py`: writes a local lmms-eval task (`deft_digits_dense`) from the dense digits test split, files on
  disk only, and scores the same samples with the repository's own evaluation (`benchmarks/digits`).

May import: `modeling_deft_llava`'s public names, transformers, torch, PIL; lmms-eval only in `lmms_eval_model.py`.
"""
