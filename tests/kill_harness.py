"""Kill harness for the reliability tests: imports the project once, then runs each command in a forked child
that SIGKILLs itself at a chosen file-system event.

Protocol (one JSON object per line on stdin, one answer per line on stdout)::

    {"call": "modeling_deft_llava.training.train:main", "argv": [...], "kill": {...} | null, "tmpdir": ...}
    -> {"status": "killed" | "exit", "code": int, "events": int, "stderr": "..."}

`kill` (all keys optional but `on`):

- `on: "fs"`: count file-system mutations (`os.replace/rename/unlink/remove/rmdir/mkdir`, the atomic helper's
  `renameat2` exchange, and safetensors' `serialize_file`) whose path lies under `under`; SIGKILL the child
  `before` (default) or `after` the `nth` one (1-based).
- `truncate: true` with `on: "fs"`: when the `nth` event is a safetensors write, the file is written, cut to half
  its size, then the child is killed: a kill in the middle of writing the weights.
- `ops`: count only these operations (`replace`, `rename`, `unlink`, `remove`, `rmdir`, `mkdir`, `exchange`,
  `write` for safetensors files); default all.
- `no_exchange: true`: the atomic helper behaves as on a file system without `renameat2` exchange.
- `on: "spawn"`: after the child starts a subprocess, write that process's id to `pidfile`, wait `delay` seconds,
  then SIGKILL the child (a kill while a validation subprocess runs).

The harness process itself never runs torch code (its children do, each freshly forked), so forking is safe.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

PRELOAD = (
    "modeling_deft_llava.training.train",
    "modeling_deft_llava.commands.convert",
    "modeling_deft_llava.commands.warm_start",
    "modeling_deft_llava.hub_card.publish",
)


def _path_of(arg, dir_fd=None) -> str | None:
    if isinstance(arg, int) or arg is None:
        return None
    path = os.fsdecode(arg)
    if dir_fd is not None and not os.path.isabs(path):
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return os.path.abspath(path)


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class FsKiller:
    """Counts file-system mutations under a folder and kills the process at the chosen one."""

    def __init__(self, spec: dict):
        self.under = os.path.abspath(spec["under"])
        self.nth = int(spec.get("nth", 1))
        self.after = spec.get("when", "before") == "after"
        self.truncate = bool(spec.get("truncate", False))
        self.match = spec.get("match")  # optional substring the path must contain
        self.no_exchange = bool(spec.get("no_exchange", False))  # force the two-rename fallback
        self.ops = set(spec.get("ops") or ())  # only these operations count (default: all)
        self.count = 0

    def hit(self, paths) -> bool:
        for path in paths:
            if path is None:
                continue
            if (path == self.under or path.startswith(self.under + os.sep)) and (
                self.match is None or self.match in path
            ):
                return True
        return False

    def wrap(self, function, path_args, op: str):
        if self.ops and op not in self.ops:
            return function

        def wrapper(*args, **kwargs):
            paths = []
            for index, dir_key in path_args:
                if index < len(args):
                    paths.append(_path_of(args[index], kwargs.get(dir_key) if dir_key else None))
            if not self.hit(paths):
                return function(*args, **kwargs)
            self.count += 1
            if self.count == self.nth and not self.after:
                _die()
            result = function(*args, **kwargs)
            if self.count == self.nth:
                _die()
            return result

        return wrapper

    def install(self) -> None:
        two = [(0, "src_dir_fd"), (1, "dst_dir_fd")]
        one = [(0, "dir_fd")]
        for name, path_args in (
            ("replace", two),
            ("rename", two),
            ("unlink", one),
            ("remove", one),
            ("rmdir", one),
            ("mkdir", one),
        ):
            setattr(os, name, self.wrap(getattr(os, name), path_args, name))
        try:
            from modeling_deft_llava.utilities import atomic_write
        except ImportError:  # the unfixed code has no helper
            atomic_write = None
        if atomic_write is not None and self.no_exchange:
            atomic_write._exchange = lambda source, target: False  # as on a file system without it
        elif atomic_write is not None:
            atomic_write._exchange = self.wrap(atomic_write._exchange, [(0, None), (1, None)], "exchange")
        import safetensors.torch

        serialize = safetensors.torch.serialize_file

        def serialize_file(tensors, filename, *args, **kwargs):
            path = _path_of(filename)
            if (self.ops and "write" not in self.ops) or not self.hit([path]):
                return serialize(tensors, filename, *args, **kwargs)
            self.count += 1
            if self.count == self.nth and not self.after and not self.truncate:
                _die()
            result = serialize(tensors, filename, *args, **kwargs)
            if self.count == self.nth:
                if self.truncate:
                    size = os.path.getsize(path)
                    with open(path, "r+b") as handle:
                        handle.truncate(size // 2)
                _die()
            return result

        safetensors.torch.serialize_file = serialize_file


def install_spawn_killer(spec: dict) -> None:
    original = subprocess.Popen.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        with open(spec["pidfile"], "w") as handle:
            handle.write(str(self.pid))
        time.sleep(float(spec.get("delay", 1.0)))
        _die()

    subprocess.Popen.__init__ = init


def run_child(command: dict, err_path: str) -> None:
    """In the forked child: install the kill hook and run the call; never returns."""
    err = open(err_path, "w")
    os.dup2(err.fileno(), 2)
    os.dup2(err.fileno(), 1)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", closefd=False), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", closefd=False), write_through=True)
    code = 0
    try:
        if command.get("tmpdir"):
            os.environ["TMPDIR"] = command["tmpdir"]
            tempfile.tempdir = command["tmpdir"]
        if command.get("cwd"):
            os.chdir(command["cwd"])
        kill = command.get("kill")
        if kill and kill["on"] == "fs":
            killer = FsKiller(kill)
            killer.install()
        elif kill and kill["on"] == "spawn":
            install_spawn_killer(kill)
        module, _, name = command["call"].partition(":")
        result = getattr(importlib.import_module(module), name)(command.get("argv", []))
        code = result if isinstance(result, int) else 0
        if kill and kill["on"] == "fs":
            print(f"\nHARNESS_EVENTS {killer.count}")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if code and not isinstance(exit_.code, int):
            print(exit_.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    print("HARNESS_READY", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        handle, err_path = tempfile.mkstemp(prefix="harness-", suffix=".log")
        os.close(handle)
        pid = os.fork()
        if pid == 0:
            run_child(command, err_path)
        _, status = os.waitpid(pid, 0)
        with open(err_path, encoding="utf-8", errors="replace") as f:
            output = f.read()
        os.unlink(err_path)
        events = [int(x.split()[1]) for x in output.splitlines() if x.startswith("HARNESS_EVENTS ")]
        if os.WIFSIGNALED(status):
            answer = {"status": "killed", "code": -os.WTERMSIG(status)}
        else:
            answer = {"status": "exit", "code": os.WEXITSTATUS(status)}
        answer.update(events=events[-1] if events else None, output=output[-6000:])
        print(json.dumps(answer), flush=True)


def export_main(argv) -> int:
    """`export_for_hub` of a saved model + processor folder: `SOURCE TARGET [--overwrite]` (for kill tests)."""
    from modeling_deft_llava.hub_card.export import export_for_hub

    from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

    model = DeftLlavaForConditionalGeneration.from_pretrained(argv[0])
    processor = DeftLlavaProcessor.from_pretrained(argv[0])
    export_for_hub(model, processor, argv[1], overwrite="--overwrite" in argv[2:])
    return 0


def warm_start_main(argv) -> int:
    """`commands.warm_start` of a DeFT-LLaVA folder for one step on the images in `warm_images/` next to it:
    `SOURCE TARGET [--overwrite]` (for kill tests)."""
    from modeling_deft_llava.commands.warm_start import main as warm_start

    images = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "warm_images")
    warm_start(
        [argv[0], "--images", images, "--out", argv[1], "--steps", "1", "--batch-size", "2", *argv[2:]]
    )
    return 0


if __name__ == "__main__":
    main()
