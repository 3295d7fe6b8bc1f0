"""`export_for_hub`: a flat, self-contained `trust_remote_code` folder for the Hugging Face Hub.

Why flat (DESIGN-NOTES, "trust_remote_code and the Hub"): transformers' dynamic-module loader copies a remote
code file and follows only `from .module import X` between files of the same folder. The project's tree uses
sub-packages (`from ..configuration.deft_settings import X`), so the export copies every code file the three
entry modules need, transitively, into the folder root and rewrites each relative import to the flat form.
`modeling_deft_llava/__init__.py` (which registers the Auto classes) is not copied: `config.auto_map` and the
processor's `auto_map` do its job on the Hub.

The folder is built in a hidden staging folder next to the target and renamed into place with
`atomic_write.place` (with `overwrite`, the old folder is swapped out in one step and deleted afterwards), so a
failure or a kill never leaves a half-written or half-deleted folder under the target's name, and a file that
another program writes into an empty target meanwhile is never deleted.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..utilities.atomic_write import place, staged
from .code_audit import audit_published_code


@dataclass(frozen=True)
class ExportFamily:
    """What the export writes for one model family: the entry modules and the two `auto_map`s."""

    # the three files the Auto classes name; everything else is found by following their relative imports
    entry_modules: tuple[str, ...]
    model_auto_map: dict
    processor_auto_map: dict

    @property
    def processor_class(self) -> str:
        return self.processor_auto_map["AutoProcessor"].rpartition(".")[2]

    @classmethod
    def named(cls, module: str, prefix: str) -> ExportFamily:
        """A family whose files are `modeling_<module>.py`, `configuration_<module>.py`, `processing_<module>.py`
        and whose classes are `<prefix>Config`, `<prefix>Model`, `<prefix>ForConditionalGeneration`,
        `<prefix>Processor` (both DeFT-LLaVA families; the NeXT entry files import the DeFT-LLaVA ones)."""
        generation = f"modeling_{module}.{prefix}ForConditionalGeneration"
        return cls(
            entry_modules=(
                f"modeling_deft_llava.modeling_{module}",
                f"modeling_deft_llava.configuration.configuration_{module}",
                f"modeling_deft_llava.processing.processing_{module}",
            ),
            model_auto_map={
                "AutoConfig": f"configuration_{module}.{prefix}Config",
                "AutoModel": f"modeling_{module}.{prefix}Model",
                "AutoModelForCausalLM": generation,
                "AutoModelForImageTextToText": generation,
            },
            processor_auto_map={"AutoProcessor": f"processing_{module}.{prefix}Processor"},
        )


LLAVA_FAMILY = ExportFamily.named("deft_llava", "DeftLlava")
NEXT_FAMILY = ExportFamily.named("deft_llava_next", "DeftLlavaNext")  # DeFT-LLaVA-NeXT (AnyRes)
ENTRY_MODULES, MODEL_AUTO_MAP, PROCESSOR_AUTO_MAP = (
    LLAVA_FAMILY.entry_modules,
    LLAVA_FAMILY.model_auto_map,
    LLAVA_FAMILY.processor_auto_map,
)
NEXT_ENTRY_MODULES, NEXT_MODEL_AUTO_MAP, NEXT_PROCESSOR_AUTO_MAP = (
    NEXT_FAMILY.entry_modules,
    NEXT_FAMILY.model_auto_map,
    NEXT_FAMILY.processor_auto_map,
)

# config.model_type -> family
FAMILIES = {
    "deft_llava": LLAVA_FAMILY,
    "deft_llava_next": NEXT_FAMILY,
}


def export_family(model) -> ExportFamily:
    """The family of `model` (by `config.model_type`).

    Raises:
        ValueError: a model of another type (names it and the exportable ones).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(
            f"export_for_hub exports DeFT-LLaVA models (model_type in {sorted(FAMILIES)}), got a "
            f"{type(model).__name__} of model_type {model_type!r}"
        )
    return FAMILIES[model_type]


# the Inference Endpoints entry point, copied as it is to `handler.py` at the folder root (`serving/handler.py`)
HANDLER_MODULE = "modeling_deft_llava.serving.handler"
HANDLER_FILE = "handler.py"

# weight formats that unpickle on load: never published
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

_FROM_RELATIVE = re.compile(r"from\s+\.+[\w.]*\s+import")


def _module_file(module_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ValueError(f"cannot find the source of module {module_name!r}")
    return Path(spec.origin)


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """Absolute name of `from <level dots><module> import ...` written in module `importer`."""
    package = importer if is_package else importer.rpartition(".")[0]
    return importlib.util.resolve_name("." * level + (module or ""), package)


def collect_code_files(entry_modules=ENTRY_MODULES) -> dict[str, tuple[str, Path]]:
    """Every project module the entry modules need, transitively, following relative imports.

    Lazy imports inside functions count too (the dynamic-module loader copies them as well).

    Returns:
        `{module_name: (flat_name, source_path)}`; `flat_name` is the file's stem in the flat folder.

    Raises:
        ValueError: an import the flat layout cannot carry (`from . import x`, an import of a package's
            `__init__`, an absolute import of the project) or two modules with the same file name.
    """
    found: dict[str, tuple[str, Path]] = {}
    todo = list(entry_modules)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(name)
        if path.name == "__init__.py":
            raise ValueError(
                f"{name} is a package: the flat Hub folder cannot carry a package's __init__; import the "
                "defining module instead (e.g. `from .configuration.deft_settings import X`)"
            )
        found[name] = (path.stem, path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "modeling_deft_llava":
                        raise ValueError(
                            f"{path}:{node.lineno}: absolute import of {alias.name!r}; the Hub copy needs a "
                            "relative `from .module import X`"
                        )
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 0:
                if (node.module or "").split(".")[0] == "modeling_deft_llava":
                    raise ValueError(
                        f"{path}:{node.lineno}: absolute import `from {node.module} import ...`; the Hub copy "
                        "needs a relative `from .module import X`"
                    )
                continue
            if node.module is None:
                raise ValueError(
                    f"{path}:{node.lineno}: `from {'.' * node.level} import ...` is not followed by the "
                    "transformers dynamic-module loader; write `from .module import X`"
                )
            todo.append(_resolve(name, False, node.level, node.module))
    stems: dict[str, str] = {}
    for name, (stem, _) in found.items():
        if stem in stems:
            raise ValueError(
                f"modules {stems[stem]!r} and {name!r} share the file name {stem}.py; the flat Hub folder "
                "needs unique file names"
            )
        stems[stem] = name
    return found


def flatten_imports(source: str, module_name: str, flat_names: dict[str, str]) -> str:
    """Rewrite every relative import of `source` (module `module_name`) to `from .<flat name> import`.

    `flat_names` maps absolute module names to their file stem in the flat folder."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        target = _resolve(module_name, False, node.level, node.module)
        if target not in flat_names:
            raise ValueError(f"{module_name}: relative import of {target!r}, which is not exported")
        row = node.lineno - 1
        head, tail = lines[row][: node.col_offset], lines[row][node.col_offset :]
        new_tail, count = _FROM_RELATIVE.subn(f"from .{flat_names[target]} import", tail, count=1)
        if count != 1:
            raise ValueError(
                f"{module_name}:{node.lineno}: cannot rewrite the import (write `from ... import` on one line)"
            )
        lines[row] = head + new_tail
    return "".join(lines)


def write_flat_code(folder: str | os.PathLike, entry_modules=ENTRY_MODULES) -> list[str]:
    """Copy the code files into `folder` with flat imports; returns the written file names."""
    found = collect_code_files(entry_modules)
    flat_names = {name: stem for name, (stem, _) in found.items()}
    written = []
    for name, (stem, path) in sorted(found.items()):
        text = flatten_imports(path.read_text(encoding="utf-8"), name, flat_names)
        (Path(folder) / f"{stem}.py").write_text(text, encoding="utf-8")
        written.append(f"{stem}.py")
    return sorted(written)


def _folder_is_empty(folder: Path) -> bool:
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))


def export_for_hub(model, processor, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a flat `trust_remote_code` folder: safetensors weights, config, generation config, processor, code.

    Args:
        model: a `DeftLlavaForConditionalGeneration` or a `DeftLlavaNextForConditionalGeneration` (the folder
            then carries the NeXT classes and their `auto_map`, `FAMILIES`).
        processor: its `DeftLlavaProcessor` / `DeftLlavaNextProcessor`.
        folder: the target; must not exist or be empty unless `overwrite=True`.
        overwrite: replace an existing non-empty folder (only once the new one is complete).

    Returns the folder. The caller's `model.config` is left as it was (`auto_map` is set for the save only).

    Raises:
        FileExistsError: `folder` holds files and `overwrite` is False.
        ValueError: the code cannot be flattened, the published code fails the audit (`code_audit.py`), or
            the save wrote a pickle-based weight file.
    """
    family = export_family(model)
    target = Path(folder).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    if not overwrite and not _folder_is_empty(target):
        raise FileExistsError(f"{target} is not empty; pass overwrite=True to replace it")
    with staged(target) as staging:
        _save_model(model, staging, family.model_auto_map)
        processor.save_pretrained(staging)
        _set_processor_auto_map(staging, family)
        written = write_flat_code(staging, family.entry_modules)
        if HANDLER_FILE in written:
            raise ValueError(f"a model code file is named {HANDLER_FILE}, which the endpoint handler needs")
        # stand-alone: it imports no project module, only the Auto classes (which read auto_map)
        (staging / HANDLER_FILE).write_text(_module_file(HANDLER_MODULE).read_text(encoding="utf-8"), "utf-8")
        pickled = sorted(p.name for p in staging.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled or not list(staging.glob("*.safetensors")):
            raise ValueError(f"the export must hold safetensors weights only, found pickled {pickled}")
        problems = audit_published_code(staging)
        if problems:
            raise ValueError("the published code fails the audit:\n" + "\n".join(problems))
        place(staging, target, overwrite=overwrite)
    return target


def _save_model(model, folder: Path, auto_map: dict = MODEL_AUTO_MAP) -> None:
    """`save_pretrained` with the Hub `auto_map`; the config's own `auto_map` is restored afterwards."""
    config = model.config
    had_auto_map = "auto_map" in config.__dict__
    previous = config.__dict__.get("auto_map")
    config.auto_map = dict(auto_map)
    try:
        # transformers 5 always writes safetensors (`safe_serialization` is gone); checked by the caller
        model.save_pretrained(folder)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(folder)
    finally:
        if had_auto_map:
            config.auto_map = previous
        else:
            config.__dict__.pop("auto_map", None)


def _set_processor_auto_map(folder: Path, family: ExportFamily = FAMILIES["deft_llava"]) -> None:
    path = folder / "processor_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data["auto_map"] = dict(family.processor_auto_map)
    data.setdefault("processor_class", family.processor_class)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = [
    "ENTRY_MODULES",
    "FAMILIES",
    "NEXT_ENTRY_MODULES",
    "NEXT_MODEL_AUTO_MAP",
    "NEXT_PROCESSOR_AUTO_MAP",
    "ExportFamily",
    "export_family",
    "HANDLER_FILE",
    "MODEL_AUTO_MAP",
    "PROCESSOR_AUTO_MAP",
    "collect_code_files",
    "export_for_hub",
]
