"""Load a Hub folder the way a user without this project would, in a separate `python -I` process.

`run_isolated_check(folder, out)` starts `python -I` on a copy of this file in a temporary folder. The child:

1. removes every editable-install finder (`__editable__...`) from `sys.meta_path`/`sys.path_hooks` and every
   `sys.path` entry under the project roots it is given, puts a finder that refuses the name first (for a
   non-editable install), then checks that `import modeling_deft_llava` fails;
2. with `HF_HUB_OFFLINE=1`, loads the folder through `AutoConfig`, `AutoProcessor`, `AutoModel`,
   `AutoModelForCausalLM`, `AutoModelForImageTextToText` and `pipeline("image-text-to-text")`, all with
   `trust_remote_code=True`;
3. runs one fixed input (an image file and a prompt) through them: logits, greedy tokens, the base model's
   hidden states, and the pipeline's text, and saves them (`torch.save`) to `out`;
4. checks that no module was imported from the project roots.

The child dies with its parent: it holds the read end of a pipe whose only write end the parent keeps, and a
thread that sees the pipe close (the parent was killed) deletes the child's temporary folder and exits, so a
killed `publish` leaves neither a running validation nor its files behind.

This file imports only the standard library at module level, so the child can run it without the project.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

PROJECT_PACKAGE = "modeling_deft_llava"
DEFAULT_PROMPT = "USER: {image}\nWhat is in the picture? ASSISTANT:"


class IsolatedCheckError(RuntimeError):
    """The folder failed to load or run without the project; the message holds the child's output."""


def project_roots() -> list[str]:
    """Folders the project's code is imported from (the repository root of an editable install)."""
    here = Path(__file__).resolve().parent  # hub_card/
    return sorted({str(here.parent)})


def run_isolated_check(
    folder,
    out,
    image=None,
    prompt: str | None = None,
    max_new_tokens: int = 4,
    forbidden_roots=None,
    timeout: float = 600,
    python: str | None = None,
    threads: int | None = None,
) -> dict:
    """Run the isolated load of `folder` in a child `python -I`; returns its JSON summary.

    Args:
        folder: the flat Hub folder.
        out: file the child writes its outputs to (`torch.save` of a dict of tensors and strings).
        image: an image file for the fixed input; None: a seeded noise image of the processor's size.
        prompt: prompt with `{image}` where the image placeholder goes; None: `DEFAULT_PROMPT`.
        forbidden_roots: folders nothing may be imported from (default: this project's root).
        timeout: seconds before the child is killed.
        threads: torch's intra-op thread count in the child (None: torch's default). A bit-exact comparison
            with outputs computed here needs the same count on both sides: another count sums in another
            order.

    Raises:
        ValueError: `threads` is not a positive int.
        IsolatedCheckError: the child failed (the message holds its stderr tail).
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    env = _child_env()
    with tempfile.TemporaryDirectory(prefix="deft-isolated-") as home:
        env["HF_HOME"] = home  # fresh module cache: the remote code is copied and imported from scratch
        # the child runs a copy of this file from outside the project, so nothing it imports is the project's
        script = Path(home) / "deft_isolated_check.py"
        shutil.copyfile(Path(__file__).resolve(), script)
        cmd = [
            python or sys.executable,
            "-I",
            str(script),
            str(Path(folder).resolve()),
            str(Path(out).resolve()),
        ]
        cmd += ["--max-new-tokens", str(max_new_tokens)]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        for root in forbidden_roots if forbidden_roots is not None else project_roots():
            cmd += ["--forbid-root", str(root)]
        if image is not None:
            cmd += ["--image", str(image)]
        if prompt is not None:
            cmd += ["--prompt", prompt]
        try:
            proc = _run_tied(cmd, cwd=home, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise IsolatedCheckError(f"the isolated load of {folder} ran past {timeout} s") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-40:])
        raise IsolatedCheckError(f"the isolated load of {folder} failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ISOLATED_SUMMARY ")]
    if not lines:
        raise IsolatedCheckError(f"the isolated load of {folder} printed no summary:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1][len("ISOLATED_SUMMARY ") :])


def run_isolated_script(script, cwd, forbidden_roots=None, timeout: float = 600, python: str | None = None):
    """Run the Python file `script` (from `cwd`) in `python -I` with the project made unimportable and
    `HF_HUB_OFFLINE=1`; returns the `subprocess.CompletedProcess` (check `returncode` yourself)."""
    env = _child_env()
    with tempfile.TemporaryDirectory(prefix="deft-isolated-") as home:
        env["HF_HOME"] = home
        runner = Path(home) / "deft_isolated_check.py"
        shutil.copyfile(Path(__file__).resolve(), runner)
        cmd = [python or sys.executable, "-I", str(runner), "--run-script", str(Path(script).resolve())]
        for root in forbidden_roots if forbidden_roots is not None else project_roots():
            cmd += ["--forbid-root", str(root)]
        return _run_tied(cmd, cwd=cwd, env=env, timeout=timeout)


def _run_tied(cmd: list[str], cwd, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` for a child that exits when this process dies: the
    child gets `--parent-pipe FD`, the read end of a pipe whose write end only this process holds."""
    read_end, write_end = os.pipe()  # both non-inheritable; only read_end is passed on
    try:
        process = subprocess.Popen(
            [*cmd[:3], "--parent-pipe", str(read_end), *cmd[3:]],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except BaseException:
        process.kill()
        process.communicate()
        raise
    finally:
        os.close(write_end)
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)


def _child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# ------------------------------------------------------------------------------------------ the child
def _under(path: Path, roots: list[Path]) -> bool:
    """True for a path under one of `roots` but not inside the running environment (a venv may live in the
    repository: its site-packages are not the project)."""
    environment = [Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    if any(path == env or env in path.parents for env in environment):
        return False
    return any(path == root or root in path.parents for root in roots)


def _strip_project(roots: list[str], block: bool = True) -> None:
    """Make the project unimportable: drop editable finders and path entries under `roots`."""

    def from_editable(obj) -> bool:
        return str(getattr(obj, "__module__", "")).startswith("__editable__")

    sys.meta_path[:] = [finder for finder in sys.meta_path if not from_editable(finder)]
    sys.path_hooks[:] = [hook for hook in sys.path_hooks if not from_editable(hook)]
    resolved = [Path(root).resolve() for root in roots]

    def under_root(entry: str) -> bool:
        if "__editable__" in entry:
            return True
        try:
            path = Path(entry or os.getcwd()).resolve()
        except OSError:
            return False
        return _under(path, resolved)

    sys.path[:] = [entry for entry in sys.path if not under_root(entry)]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    for name in list(sys.modules):
        if name == PROJECT_PACKAGE or name.startswith(PROJECT_PACKAGE + "."):
            del sys.modules[name]
    if block:  # last layer, for a non-editable install in the environment's site-packages: refuse the name
        sys.meta_path.insert(0, _ProjectBlocker)


class _ProjectBlocker:
    """Meta-path finder that makes `import modeling_deft_llava` fail as if the package were not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == PROJECT_PACKAGE or name.startswith(PROJECT_PACKAGE + "."):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by isolated_check)", name=name)
        return None


def _assert_project_unimportable() -> None:
    try:
        spec = importlib.util.find_spec(PROJECT_PACKAGE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None:
        raise SystemExit(f"isolation failed: {PROJECT_PACKAGE} is still importable")
    try:
        importlib.import_module(PROJECT_PACKAGE)
    except ImportError:
        return
    raise SystemExit(f"isolation failed: `import {PROJECT_PACKAGE}` worked")


def _imported_from(roots: list[str]) -> list[str]:
    resolved = [Path(root).resolve() for root in roots]
    bad = []
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and _under(Path(path).resolve(), resolved):
            bad.append(f"{name} ({path})")
    return bad


def _exit_with_parent(argv: list[str]) -> list[str]:
    """In the child: start the thread that ends this process (and deletes its temporary folder, the one this
    script was copied to) once the parent's end of `--parent-pipe FD` closes; returns the other arguments."""
    if not argv or argv[0] != "--parent-pipe":
        return argv
    pipe, home = int(argv[1]), Path(__file__).resolve().parent

    def watch() -> None:
        while os.read(pipe, 1):  # the parent never writes: this returns b"" once it is gone
            pass
        shutil.rmtree(home, ignore_errors=True)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return argv[2:]


def _child(argv=None) -> None:
    argv = _exit_with_parent(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--run-script":
        _run_script_child(argv[1:])
        return
    parser = argparse.ArgumentParser(
        description="isolated trust_remote_code load (run by run_isolated_check)"
    )
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--image")
    parser.add_argument("--prompt")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--forbid-root", action="append", default=[])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    _strip_project(args.forbid_root)
    _assert_project_unimportable()

    import gc

    import numpy as np
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers
    from PIL import Image
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        pipeline,
    )

    folder = args.folder
    summary = {"threads": torch.get_num_threads(), "transformers_version": transformers.__version__}
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    for what, obj in (("config", config), ("processor", processor)):
        summary[f"{what}_class"] = f"{type(obj).__module__}.{type(obj).__name__}"
    if args.image:  # as the shipped processor converts (16-bit grey scaled to 8 bits, not clipped)
        package = type(processor).__module__.rpartition(".")[0]
        image = importlib.import_module(f"{package}.image_depth").to_rgb(Image.open(args.image))
    else:
        crop = getattr(processor.image_processor, "crop_size", None) or {"height": 336, "width": 336}
        pixels = np.random.default_rng(0).integers(0, 255, (crop["height"], crop["width"], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    prompt = (args.prompt or DEFAULT_PROMPT).replace("{image}", processor.image_token)
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    results = {"input_ids": inputs["input_ids"], "prompt": prompt}
    generate_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    for name, auto in (
        ("causal_lm", AutoModelForCausalLM),
        ("image_text_to_text", AutoModelForImageTextToText),
        ("base", AutoModel),
    ):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        summary[f"{name}_class"] = f"{type(model).__module__}.{type(model).__name__}"
        with torch.no_grad():
            if name == "base":
                results["base_last_hidden_state"] = model(**inputs).last_hidden_state
            else:
                results[f"{name}_logits"] = model(**inputs).logits
                results[f"{name}_generated"] = model.generate(**inputs, **generate_kwargs)
        del model
        gc.collect()

    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    summary["pipeline_model_class"] = f"{type(pipe.model).__module__}.{type(pipe.model).__name__}"
    output = pipe(images=image, text=prompt, generate_kwargs=generate_kwargs, return_full_text=False)
    results["pipeline_text"] = output[0]["generated_text"]
    del pipe
    gc.collect()

    leaked = _imported_from(args.forbid_root)
    if leaked:
        raise SystemExit("isolation failed: modules imported from the project: " + ", ".join(leaked))
    try:
        summary["project_importable"] = importlib.util.find_spec(PROJECT_PACKAGE) is not None
    except ModuleNotFoundError:
        summary["project_importable"] = False
    summary["pipeline_text"] = results["pipeline_text"]
    torch.save(results, args.out)
    print("ISOLATED_SUMMARY " + json.dumps(summary), flush=True)


def _run_script_child(argv) -> None:
    parser = argparse.ArgumentParser(description="run a script without the project (run_isolated_script)")
    parser.add_argument("script")
    parser.add_argument("--forbid-root", action="append", default=[])
    args = parser.parse_args(argv)
    _strip_project(args.forbid_root)
    _assert_project_unimportable()
    import runpy

    runpy.run_path(args.script, run_name="__main__")
    leaked = _imported_from(args.forbid_root)
    if leaked:
        raise SystemExit("isolation failed: modules imported from the project: " + ", ".join(leaked))


if __name__ == "__main__":
    _child()
