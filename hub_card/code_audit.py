"""`audit_published_code`: an allow-list gate on the Python files of a Hub folder before anyone runs them.

Users run this code with `trust_remote_code=True`, so it must be boring. What is checked, statically (`ast`):

1. imports: every imported module, and every name taken with `from module import name`, is on the allow-list
   (`ALLOWED`); relative imports only in the flat `from .module import X` form, of files of the folder;
2. names reached through an import: every attribute chain that starts at an imported name resolves to a
   qualified name (`F.softmax` -> `torch.nn.functional.softmax`, `np.load` -> `numpy.load`) that is on the
   allow-list, and none of its parts loads files or code (`LOADERS`); an imported *module* may only be used
   through its attributes, never as a value (`m = torch`, `getattr(torch, name)` could reach anything);
3. builtins: only `ALLOWED_BUILTINS` (no `eval`, `exec`, `compile`, `open`, `__import__`, `globals`, ...);
4. attributes that open the interpreter's internals (`__subclasses__`, `__globals__`, `__builtins__`, ...) are
   refused, also as `getattr` strings.

The allow-list names what the published code may use: a few pure standard-library modules, and from torch,
transformers, numpy, PIL, packaging and huggingface_hub exactly the parts the model code needs. torch's tensor
operations are allowed as a group (the functions torch lets `__torch_function__` override; `torch.load` and the
other file, code-loading and process functions are not among them). A new use fails the export with a message
naming it: add it to `ALLOWED` after checking what it does.

Not checked: methods called on objects (`tensor.numpy()`, `super().from_pretrained(...)`) are not resolved, and
code that builds attribute names at run time on non-module objects is not followed. The audit stops the usual
ways in which code reaches the network, the file system, other programs or pickle; it is a review gate, not a
sandbox.
"""

from __future__ import annotations

import ast
import builtins
import functools
from pathlib import Path

ANY = "*"
# module (or class) -> names allowed in it; `*`: every name (pure modules)
# fmt: off
ALLOWED: dict[str, frozenset[str]] = {name: frozenset(names) for name, names in {
    # standard library: computation only
    "__future__": {"annotations"},
    "abc": {ANY},
    "collections": {ANY},
    "contextlib": {"contextmanager", "nullcontext"},
    "copy": {"copy", "deepcopy"},
    "dataclasses": {ANY},
    "difflib": {"get_close_matches"},  # "did you mean" suggestions in error messages
    "enum": {ANY},
    "functools": {"cached_property", "lru_cache", "partial", "reduce", "wraps"},
    "itertools": {ANY},
    "logging": {"getLogger"},
    "math": {ANY},
    "numbers": {ANY},
    "operator": {ANY},
    "typing": {ANY},
    "warnings": {"warn"},
    "zlib": {"adler32", "crc32"},
    # third party
    "huggingface_hub": {"dataclasses"},
    "huggingface_hub.dataclasses": {"strict"},
    "numpy": {
        "asarray", "array", "clip", "float32", "float64", "int32", "int64", "ndarray", "rint", "stack", "uint8",
        "uint16",
    },
    "packaging": {"version"},
    "packaging.version": {"Version"},
    "PIL": {"Image"},
    "PIL.Image": {"Image", "fromarray"},
    "torch": {
        # classes, dtypes, grad modes and pure-math namespaces (tensor operations: `torch_tensor_operations`)
        "Generator", "LongTensor", "Tensor", "autograd", "bfloat16", "bool", "device", "dtype", "enable_grad",
        "compiler", "finfo", "float16", "float32", "float64", "iinfo", "inference_mode", "int32", "int64",
        "is_grad_enabled", "linalg", "long", "nn", "no_grad", "uint8",
        # factories (not overridable, so not in the tensor-operation group)
        "arange", "as_tensor", "empty", "eye", "full", "full_like", "linspace", "ones", "ones_like", "rand",
        "randn", "randperm", "tensor", "zeros", "zeros_like",
    },
    "torch.autograd": {"grad"},
    "torch.compiler": {"is_compiling"},  # skips host-side checks while torch.compile traces
    "torch.linalg": {ANY},
    "torch.nn": {ANY},
    "torch.nn.functional": {ANY},
    "transformers": {
        "AutoModel", "GenerationMixin", "LlavaConfig", "LlavaForConditionalGeneration", "LlavaModel",
        "LlavaProcessor",
        # DeFT-LLaVA-NeXT (AnyRes): the stock classes it subclasses
        "LlavaNextConfig", "LlavaNextForConditionalGeneration", "LlavaNextModel", "LlavaNextProcessor",
        "__version__", "cache_utils", "image_processing_utils", "image_utils", "initialization",
        "modeling_outputs", "models", "utils",
    },
    # loading a model by name would fetch other code: only building one from a config
    "transformers.AutoModel": {"from_config"},
    "transformers.cache_utils": {"Cache", "DynamicCache"},
    "transformers.image_processing_utils": {"select_best_resolution"},  # pure arithmetic on sizes
    "transformers.image_utils": {"get_image_size", "to_numpy_array"},
    "transformers.initialization": {ANY},
    "transformers.modeling_outputs": {ANY},
    "transformers.models": {"llava", "llava_next"},
    "transformers.models.llava": {"modeling_llava"},
    "transformers.models.llava_next": {"modeling_llava_next"},
    # the AnyRes grid arithmetic (pure functions on sizes and tensors) and the base class
    "transformers.models.llava_next.modeling_llava_next": {
        "LlavaNextPreTrainedModel", "get_anyres_image_grid_shape", "image_size_to_num_patches", "unpad_image",
    },
    "transformers.models.llava.modeling_llava": {
        "LlavaCausalLMOutputWithPast", "LlavaModelOutputWithPast", "LlavaMultiModalProjector",
        "LlavaPreTrainedModel",
    },
    "transformers.utils": {"generic", "logging"},
    "transformers.utils.generic": {"can_return_tuple"},
    "transformers.utils.logging": {"get_logger"},
}.items()}
# never allowed in a resolved name, whatever the allow-list says about the rest: they load files or code
LOADERS = frozenset(
    {
        "from_pretrained", "load", "loads", "load_library", "load_inline", "hf_hub_download", "snapshot_download",
        "cached_file", "urlopen",
    }
)
ALLOWED_BUILTINS = frozenset(
    {
        "abs", "all", "any", "bool", "bytes", "callable", "chr", "classmethod", "dict", "divmod", "enumerate",
        "filter", "float", "format", "frozenset", "getattr", "hasattr", "hash", "int", "isinstance", "issubclass",
        "iter", "len", "list", "map", "max", "min", "next", "object", "ord", "pow", "print", "property", "range",
        "repr", "reversed", "round", "set", "setattr", "slice", "sorted", "staticmethod", "str", "sum", "super",
        "tuple", "type", "vars", "zip", "None", "True", "False", "NotImplemented", "Ellipsis", "__name__", "__debug__",
    }
    | {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
)
FORBIDDEN_ATTRIBUTES = frozenset(
    {
        "__subclasses__", "__globals__", "__builtins__", "__code__", "__closure__", "__import__", "__loader__",
        "__spec__", "__base__", "__bases__", "__mro__", "__getattribute__", "__reduce__", "__reduce_ex__",
        "f_globals", "f_locals", "f_back", "gi_frame", "tb_frame",
    }
)
# why a few well-known names are refused (for the message)
_REASONS = {
    "load": "unpickles or loads files",
    "loads": "unpickles",
    "from_pretrained": "downloads files and code",
    "hf_hub_download": "network access",
    "snapshot_download": "network access",
    "cached_file": "network access",
    "urlopen": "network access",
    "system": "runs programs",
    "popen": "runs programs",
    "load_library": "loads native code",
    "load_inline": "compiles and loads native code",
}
# standard-library modules whose import gets a more specific message (network, processes, native code, pickle)
FORBIDDEN_STDLIB = frozenset(
    {
        "socket", "ssl", "socketserver", "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib",
        "xmlrpc", "webbrowser", "asyncio", "subprocess", "multiprocessing", "ctypes", "pickle", "_pickle",
        "cPickle", "marshal", "shelve", "copyreg", "os", "sys", "importlib", "builtins", "shutil", "pathlib", "io",
    }
)
ALLOWED_PACKAGES = frozenset({"torch", "transformers", "huggingface_hub", "numpy", "PIL", "packaging"})
# Files that are entry points rather than model code, with the exact names each may use beyond `ALLOWED`.
# `handler.py` (Inference Endpoints, `serving/handler.py`) decodes request images from memory and loads the
# folder's own model and processor (their code is this folder's, audited with the rest): nothing else.
ENTRY_POINT_ALLOWED: dict[str, frozenset[str]] = {
    "handler.py": frozenset({
        "base64", "base64.b64decode", "binascii", "binascii.Error", "io", "io.BytesIO", "PIL.Image.open",
        "transformers.AutoProcessor", "transformers.AutoProcessor.from_pretrained",
        "transformers.AutoModelForImageTextToText", "transformers.AutoModelForImageTextToText.from_pretrained",
    }),
}
# fmt: on


@functools.lru_cache(maxsize=1)
def torch_tensor_operations() -> frozenset[str]:
    """Names of the `torch.*` functions that `__torch_function__` can override: tensor math, nothing that
    reads files or loads code (`torch.load`, `torch.hub`, `torch.jit`, `torch.ops` are not among them)."""
    try:
        import torch
        from torch.overrides import get_overridable_functions
    except ImportError:
        return frozenset()
    return frozenset(getattr(f, "__name__", "") for f in get_overridable_functions().get(torch, ()))


def allowed_name(qualified: str, extra: frozenset[str] = frozenset()) -> bool:
    """Whether the dotted name `qualified` (e.g. `torch.nn.functional.softmax`) is on the allow-list, or is one
    of the exact names in `extra` (an entry point's additions, `ENTRY_POINT_ALLOWED`)."""
    if qualified in extra:
        return True
    parts = qualified.split(".")
    if any(part in LOADERS for part in parts[1:]):
        return False
    if parts[0] not in ALLOWED:
        return False
    for depth in range(1, len(parts)):
        owner, name = ".".join(parts[:depth]), parts[depth]
        if owner not in ALLOWED:
            return True  # an allowed object whose attributes are not listed (a class's methods)
        names = ALLOWED[owner]
        if ANY in names:
            return True
        if name not in names and not (owner == "torch" and name in torch_tensor_operations()):
            return False
    return True


def _reason(qualified: str) -> str:
    reason = next((_REASONS[p] for p in reversed(qualified.split(".")) if p in _REASONS), None)
    top = qualified.split(".")[0]
    if reason is None and top in FORBIDDEN_STDLIB:
        reason = "forbidden module: network, processes, files or pickle"
    return f" ({reason})" if reason else ""


class _Auditor(ast.NodeVisitor):
    def __init__(self, filename: str, local_modules: set[str], tree: ast.AST):
        self.filename, self.local_modules = filename, local_modules
        self.extra = ENTRY_POINT_ALLOWED.get(filename, frozenset())
        self.aliases: dict[str, str] = {}  # bound name -> qualified name
        self.modules: set[str] = set()  # bound names that hold a module
        self.parents: dict[ast.AST, ast.AST] = {}
        self.bound: set[str] = set()  # names this file defines (they shadow builtins)
        self.problems: list[str] = []
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store | ast.Del):
                self.bound.add(node.id)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                self.bound.add(node.name)
            elif isinstance(node, ast.arg):
                self.bound.add(node.arg)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                self.bound.add(node.name)
        # imports first (a function may use a name imported further down the file)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self._import(node)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(node)

    def report(self, node: ast.AST, message: str) -> None:
        self.problems.append(f"{self.filename}:{getattr(node, 'lineno', '?')}: {message}")

    # ---------------------------------------------------------------- imports
    def _import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._check_module(node, alias.name)
            if alias.asname:
                self.aliases[alias.asname] = alias.name
                self.modules.add(alias.asname)
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top
                self.modules.add(top)

    def _import_from(self, node: ast.ImportFrom) -> None:
        if node.level:
            if node.level != 1 or node.module is None or "." in node.module:
                self.report(node, "relative import must be `from .module import X`")
            elif node.module not in self.local_modules:
                self.report(node, f"imports .{node.module}, which is not in the folder")
            return
        module = node.module or ""
        self._check_module(node, module)
        for alias in node.names:
            qualified = f"{module}.{alias.name}"
            if alias.name == "*":
                self.report(node, f"`from {module} import *` hides what is used")
                continue
            if not allowed_name(qualified, self.extra) and module != "__future__":
                self.report(node, f"imports {qualified}{_reason(qualified)}, which is outside the allow-list")
            self.aliases[alias.asname or alias.name] = qualified
            if qualified in ALLOWED and qualified != "transformers.AutoModel":
                self.modules.add(alias.asname or alias.name)

    def _check_module(self, node: ast.AST, module: str) -> None:
        parts = module.split(".")
        if not all(allowed_name(".".join(parts[: i + 1]), self.extra) for i in range(len(parts))) or (
            module not in ALLOWED and module not in self.extra
        ):
            kind = "forbidden module" if parts[0] in FORBIDDEN_STDLIB else "a module"
            self.report(node, f"imports {kind} {module!r}, which is outside the allow-list")

    # ---------------------------------------------------------------- names
    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            return
        if node.id in self.aliases:
            self._check_chain(node)
        elif node.id in FORBIDDEN_ATTRIBUTES or (
            hasattr(builtins, node.id) and node.id not in self.bound and node.id not in ALLOWED_BUILTINS
        ):
            self.report(node, f"uses {node.id}(), which is outside the allowed builtins")

    def _check_chain(self, node: ast.Name) -> None:
        parts, top = [self.aliases[node.id]], node
        while isinstance(self.parents.get(top), ast.Attribute) and self.parents[top].value is top:
            top = self.parents[top]
            parts.append(top.attr)
        qualified = ".".join(parts)
        if not allowed_name(qualified, self.extra):
            self.report(node, f"uses {qualified}{_reason(qualified)}, which is outside the allow-list")
        elif top is node and node.id in self.modules:
            self.report(node, f"uses the module {qualified} as a value (only its attributes may be used)")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in FORBIDDEN_ATTRIBUTES:
            self.report(node, f"uses .{node.attr}")
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr"):
            for argument in node.args[1:2]:
                if isinstance(argument, ast.Constant) and argument.value in FORBIDDEN_ATTRIBUTES:
                    self.report(node, f"uses .{argument.value} through {node.func.id}")
        self.generic_visit(node)


def audit_source(source: str, filename: str, local_modules: set[str]) -> list[str]:
    """Problems found in one file; `local_modules` are the stems of the folder's own `.py` files."""
    tree = ast.parse(source, filename=filename)
    auditor = _Auditor(filename, local_modules, tree)
    auditor.visit(tree)
    return auditor.problems


def audit_published_code(folder) -> list[str]:
    """Problems found in every `.py` file at the root of `folder` (empty list: the code passes)."""
    files = sorted(Path(folder).glob("*.py"))
    local = {path.stem for path in files}
    problems = []
    for path in files:
        problems += audit_source(path.read_text(encoding="utf-8"), path.name, local)
    return problems


__all__ = [
    "ALLOWED",
    "ALLOWED_BUILTINS",
    "ALLOWED_PACKAGES",
    "ENTRY_POINT_ALLOWED",
    "FORBIDDEN_STDLIB",
    "allowed_name",
    "audit_published_code",
    "audit_source",
]
