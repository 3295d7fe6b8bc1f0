"""Command-line entry points (`python -m modeling_deft_llava.commands.<name>`): `convert` (a stock LLaVA
folder to a DeFT-LLaVA folder), `visualize` (kept tokens outlined on the image), `demo` (the bare
`DeFTModule` on a real photo). They use the model's public API only.
"""
