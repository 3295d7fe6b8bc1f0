"""Hub publishing: the flat trust_remote_code export, the model-card generator and the upload command.

Installed as `modeling_deft_llava.hub_card`. May import the model, configuration and processing.

- `export.py`: `export_for_hub(model, processor, folder)`, the flat, self-contained `trust_remote_code` folder.
- `code_audit.py`: allow-list gate on the published code (imports, names used through them, builtins).
- the kill-safe folder writes it uses live in `utilities/atomic_write.py` (shared by every writer of the project).
- `isolated_check.py`: loads a Hub folder in `python -I` with the project made unimportable (standard library
  only at module level: the child process runs a copy of it).
- `model_card.py` + `template.md`: `build_model_card(config, results, base_model, license)`.
- `publish.py`: `python -m modeling_deft_llava.hub_card.publish FOLDER REPO_ID [--dry-run OUT] ...`.
"""
