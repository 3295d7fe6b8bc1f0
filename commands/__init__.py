"""Command-line entry points (`python -m modeling_deft_llava.commands.<name>`): `convert` (a stock LLaVA
folder to a DeFT-LLaVA folder), `visualize` (kept tokens outlined on the image), `demo` (the bare
`DeFTModule` on a real photo), `warm_start` (a label-free warm start of DeFT's scorer on unlabelled images;
the training logic lives in `training/warm_start.py`). They use the model's public API only.

The top floor: installed as `modeling_deft_llava.commands` (pyproject's package-dir maps this folder), so the
module paths above are unchanged; they import the model, `training/` and `processing/`, and no module of the
package imports them. `utilities/process_state.py` (`restores_process_state`), which the commands, training and
the benchmarks share, lives below them.
"""
