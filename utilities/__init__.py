"""Shared utilities with no place in the model: every floor may import them, and they import nothing of the
project (standard library, and torch for `process_state`).

Installed as `modeling_deft_llava.utilities`.

- `atomic_write.py`: kill-safe folder writes and locks (staging, completeness marker, swap into place, recovery,
  `run_lock`), used by every writer of the project: checkpoints and the final adapter (`training/`), `convert`
  (`commands/`), `export_for_hub` and `publish --dry-run` (`hub_card/`), the benchmarks' results files.
- `process_state.py`: `restores_process_state`, which makes an entry point called in-process leave torch's
  process-wide settings as it found them (the commands, `training.warm_start`, the benchmarks).
"""
