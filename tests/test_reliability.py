"""Kill safety of every writer: training checkpoints, rotation, the final adapter, `convert`, `export_for_hub`,
the warm start and `publish --dry-run`, plus the guards that keep a second run from overwriting a first.

Each kill is a real SIGKILL of a process at a chosen file-system event (`kill_harness.py`: the project is
imported once, each run is a freshly forked child). After a kill the on-disk state must be the old complete one
or the new complete one, and the next run must clean up and finish as an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
from modeling_deft_llava.hub_card.export import export_for_hub
from modeling_deft_llava.utilities.atomic_write import run_lock
from safetensors.torch import load_file
from test_training import make_workspace, run_args

REPO = Path(__file__).resolve().parents[1]
RATIO = 0.25
MARKER = "save_complete.json"  # written by the fixed code; ignored when comparing file sets


# ----------------------------------------------------------------------------- the harness
class Harness:
    """`python tests/kill_harness.py`, started once: each `run` forks a child that may SIGKILL itself."""

    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(REPO / "tests"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        env.pop("CUDA_VISIBLE_DEVICES", None)
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "kill_harness.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        line = self.process.stdout.readline()
        assert line.strip() == "HARNESS_READY", line

    def run(self, call: str, argv, kill=None, tmpdir=None, cwd=None) -> dict:
        command = dict(call=call, argv=[str(a) for a in argv], kill=kill, tmpdir=tmpdir, cwd=cwd)
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def train(self, argv, **kwargs) -> dict:
        return self.run("modeling_deft_llava.training.train:main", argv, **kwargs)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def harness():
    running = Harness()
    yield running
    running.close()


# ----------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("reliability"))


def args_for(workspace, out, *extra) -> list[str]:
    """7 steps of 2 per epoch (8 rows, batch 4): the end is not an epoch boundary; constant learning rate, so a
    step too many changes every trained tensor."""
    return run_args(workspace, out, "--lr_scheduler_type", "constant", *extra, max_steps=7)


@pytest.fixture(scope="module")
def reference(harness, workspace):
    """One uninterrupted run: checkpoint-4, checkpoint-7 and the final adapter."""
    out = workspace["root"] / "reference"
    done = harness.train(args_for(workspace, out))
    assert done == {**done, "status": "exit", "code": 0}, done["output"]
    return out


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: bytes and modification time."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def file_names(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MARKER}


def assert_complete_checkpoint(folder: Path, reference_folder: Path):
    """Every file of the reference checkpoint is there and the weights load."""
    assert folder.is_dir(), f"{folder.name} is missing"
    assert file_names(folder) == file_names(reference_folder), folder
    load_file(str(folder / "adapter_model.safetensors"))


def assert_same_adapter(out: Path, reference: Path):
    got = load_file(str(out / "adapter_model.safetensors"))
    want = load_file(str(reference / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"{len(differ)} of {len(want)} tensors differ from the uninterrupted run"


def checkpoints(out: Path) -> list[str]:
    return sorted(
        (p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n[11:])
    )


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def resume(harness, workspace, out):
    done = harness.train(args_for(workspace, out, "--resume", "true"))
    assert done["status"] == "exit" and done["code"] == 0, done["output"]
    return done


def test_resuming_a_finished_run_changes_nothing(harness, workspace, reference, tmp_path):
    out = tmp_path / "finished"
    shutil.copytree(reference, out)
    before = snapshot(out)
    resume(harness, workspace, out)
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-7"]  # no checkpoint-8 of a step too many
    after = snapshot(out)
    assert after.keys() == before.keys()
    changed = [name for name in before if before[name] != after[name]]
    assert not changed, changed
    assert_same_adapter(out, reference)


@pytest.mark.parametrize(
    "nth, exchange",
    [(1, True), (1, False), (2, False)],
    ids=["exchange", "two-renames-first", "two-renames-second"],
)
def test_a_kill_while_replacing_a_checkpoint_keeps_a_complete_copy(
    harness, workspace, reference, tmp_path, nth, exchange
):
    """Resume from checkpoint-4 while checkpoint-7 exists: at step 7 the new checkpoint-7 replaces the old one;
    the process is killed after the `nth` file-system change to checkpoint-7."""
    out = tmp_path / "replace"
    shutil.copytree(reference, out)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (out / name).unlink()  # the run was killed before its final save
    kill = dict(on="fs", under=str(out / "checkpoint-7"), nth=nth, when="after", no_exchange=not exchange)
    killed = harness.train(
        args_for(workspace, out, "--resume_from_checkpoint", str(out / "checkpoint-4")), kill=kill
    )
    assert killed["status"] == "killed", killed["output"]
    if exchange:  # renameat2 exchange: the name always holds a complete folder
        assert_complete_checkpoint(out / "checkpoint-7", reference / "checkpoint-7")
    resume(harness, workspace, out)
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-7"]
    assert_complete_checkpoint(out / "checkpoint-7", reference / "checkpoint-7")
    assert hidden(out) == []
    assert_same_adapter(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_kill_at_any_step_of_a_checkpoint_replacement(harness, workspace, reference, tmp_path, exchange):
    """As above, killed before each rename, exchange, folder creation or removal whose path names checkpoint-7
    (the staging folder, the marker, the swap, the trash), in turn; then resumed."""
    ops = ["replace", "rename", "exchange", "mkdir", "rmdir"]
    spec = dict(on="fs", match="checkpoint-7", ops=ops, no_exchange=not exchange)
    argv = ["--resume_from_checkpoint", None]

    def fresh(name):
        out = tmp_path / name
        shutil.copytree(reference, out)
        for file in ("adapter_model.safetensors", "adapter_config.json"):
            (out / file).unlink()
        argv[1] = str(out / "checkpoint-4")
        return out

    out = fresh("probe")
    probe = harness.train(args_for(workspace, out, *argv), kill={**spec, "under": str(out), "nth": 10**6})
    assert probe["code"] == 0 and probe["events"], probe["output"]
    for nth in range(1, probe["events"] + 1):
        out = fresh(f"kill-{nth}")
        killed = harness.train(args_for(workspace, out, *argv), kill={**spec, "under": str(out), "nth": nth})
        assert killed["status"] == "killed", (nth, killed["output"])
        if exchange:
            assert_complete_checkpoint(out / "checkpoint-7", reference / "checkpoint-7")
        resume(harness, workspace, out)
        assert checkpoints(out) == ["checkpoint-4", "checkpoint-7"], nth
        assert hidden(out) == [], nth
        assert_same_adapter(out, reference)
        shutil.rmtree(out)


@pytest.mark.parametrize("where", ["its-name", "half-deleted"])
def test_a_kill_during_rotation_leaves_no_half_deleted_checkpoint(
    harness, workspace, reference, tmp_path, where
):
    """Checkpoints every 2 steps, at most 2 kept: at step 7 checkpoint-4 is deleted. The kill comes at the first
    change to checkpoint-4 after its creation, or half-way through deleting its files."""
    out = tmp_path / "rotate"
    extra = ("--save_steps", "2", "--save_total_limit", "2")
    if where == "its-name":
        kill = dict(on="fs", under=str(out / "checkpoint-4"), nth=2, when="after")  # 1: its creation
    else:  # once out of the way (renamed), the files are deleted
        kill = dict(
            on="fs", under=str(out), match=".checkpoint-4.trash-", ops=["unlink"], nth=2, when="after"
        )
    killed = harness.train(args_for(workspace, out, *extra), kill=kill)
    assert killed["status"] == "killed", killed["output"]
    for name in checkpoints(out):  # whatever is left under a checkpoint name is complete
        assert_complete_checkpoint(out / name, reference / "checkpoint-7")
    done = harness.train(args_for(workspace, out, *extra, "--resume", "true"))
    assert done["code"] == 0, done["output"]
    assert checkpoints(out) == ["checkpoint-6", "checkpoint-7"]
    assert hidden(out) == []
    assert_same_adapter(out, reference)


def test_a_kill_while_writing_the_final_adapter(harness, workspace, reference, tmp_path):
    """The third weights file written is the final adapter (after checkpoint-4 and checkpoint-7): it is cut to
    half its size and the process killed."""
    out = tmp_path / "final"
    kill = dict(on="fs", under=str(out), match="adapter_model.safetensors", nth=3, truncate=True)
    killed = harness.train(args_for(workspace, out), kill=kill)
    assert killed["status"] == "killed", killed["output"]
    weights = out / "adapter_model.safetensors"
    if weights.exists():  # the previous state (no adapter) or a complete one
        load_file(str(weights))
    resume(harness, workspace, out)
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-7"]
    assert hidden(out) == []
    assert_same_adapter(out, reference)


def test_training_into_a_used_folder_needs_resume_or_overwrite(harness, workspace, reference, tmp_path):
    out = tmp_path / "used"
    shutil.copytree(reference, out)
    before = snapshot(out)
    again = harness.train(args_for(workspace, out))
    assert again["status"] == "exit" and again["code"] != 0
    assert "--resume" in again["output"] and "--overwrite_output_dir" in again["output"]
    assert snapshot(out) == before  # nothing was touched
    (out / "notes.txt").write_text("not from training")
    fresh = harness.train(args_for(workspace, out, "--overwrite_output_dir", "true"))
    assert fresh["code"] == 0, fresh["output"]
    assert checkpoints(out) == ["checkpoint-4", "checkpoint-7"] and not (out / "notes.txt").exists()
    assert_same_adapter(out, reference)


def test_two_runs_never_write_into_one_output_dir(harness, workspace, tmp_path):
    out = tmp_path / "shared"
    with run_lock(out):  # a live run holds the folder
        second = harness.train(args_for(workspace, out))
    assert second["status"] == "exit" and second["code"] != 0
    assert "another run is writing into" in second["output"] and str(os.getpid()) in second["output"]
    assert not out.exists() or not any(out.iterdir())  # the second run wrote nothing
    assert not list(tmp_path.glob(".shared.run-lock"))  # released: the lock file is gone


def test_resume_never_starts_over_on_top_of_unmarked_checkpoints(harness, workspace, reference, tmp_path):
    """Checkpoint folders without a matching marker (half-written, half-deleted, or from an older version) are
    not resumed from, and not silently replaced by a run from scratch either."""
    out = tmp_path / "unmarked"
    shutil.copytree(reference / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-4" / MARKER).unlink(missing_ok=True)
    before = snapshot(out)
    done = harness.train(args_for(workspace, out, "--resume", "true"))
    assert done["status"] == "exit" and done["code"] != 0
    assert "--resume_from_checkpoint" in done["output"] and "checkpoint-4" in done["output"]
    assert snapshot(out) == before
    explicit = harness.train(args_for(workspace, out, "--resume_from_checkpoint", out / "checkpoint-4"))
    assert explicit["code"] == 0, explicit["output"]
    assert_same_adapter(out, reference)


# ----------------------------------------------------------------------------- convert, export, publish
CONVERT = "modeling_deft_llava.commands.convert:main"
EXPORT = "kill_harness:export_main"
WARM_START = "kill_harness:warm_start_main"


def exchange_works(folder: Path) -> bool:
    """Whether this file system swaps two folders atomically (Linux `renameat2(RENAME_EXCHANGE)`)."""
    import ctypes

    a, b = folder / ".probe-a", folder / ".probe-b"
    a.mkdir()
    b.mkdir()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        return renameat2 is not None and renameat2(-100, bytes(a), -100, bytes(b), 2) == 0
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture(scope="module")
def sources(workspace):
    """A stock LLaVA folder (for `convert`) and a saved DeFT-LLaVA folder (for `export_for_hub` and the warm
    start)."""
    root = workspace["root"]
    model = tiny.model(use_deft=True, deft_retention_ratio=RATIO)
    stock = root / "stock"
    tiny.stock_twin(model).save_pretrained(stock)
    tiny.processor().save_pretrained(stock)
    saved = root / "saved"
    model.save_pretrained(saved)
    tiny.processor(use_deft=True, deft_retention_ratio=RATIO).save_pretrained(saved)
    (root / "warm_images").mkdir()  # the warm start's unlabelled images (kill_harness.warm_start_main)
    for i, image in enumerate(tiny.images(2)):
        image.save(root / "warm_images" / f"{i}.png")
    return dict(convert=(CONVERT, stock), export=(EXPORT, saved), warm_start=(WARM_START, saved))


def assert_complete_folder(folder: Path, names: set[str]):
    assert folder.is_dir(), f"{folder.name} is missing"
    assert file_names(folder) == names, sorted(names ^ file_names(folder))
    json.loads((folder / "config.json").read_text())
    load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
# the warm start writes through the same helper as convert (about 40 s here): slow
@pytest.mark.parametrize("writer", ["convert", "export", pytest.param("warm_start", marks=pytest.mark.slow)])
def test_overwrite_killed_at_every_step_keeps_a_complete_folder(harness, sources, tmp_path, writer, exchange):
    """`convert --overwrite` / `export_for_hub(overwrite=True)` onto a complete folder, killed before each of its
    file-system changes in turn: the name holds a complete folder after every kill (with the exchange; without
    it the old folder may wait under a hidden name, and the next run puts it back), and the next run leaves
    nothing hidden behind."""
    if exchange and not exchange_works(tmp_path):
        pytest.skip("this file system has no renameat2 exchange")
    call, source = sources[writer]
    pristine = tmp_path / "pristine"
    pristine.mkdir()
    done = harness.run(call, [source, pristine / "out"])
    assert done["code"] == 0, done["output"]
    names = file_names(pristine / "out")
    work = tmp_path / "work"
    # renames, exchanges and folder creation/removal: the steps that change what the names hold (file writes
    # happen inside the private staging folder; rmtree of a hidden folder removes files that nothing names)
    ops = ["replace", "rename", "exchange", "mkdir", "rmdir"]
    count = dict(on="fs", under=str(work), nth=10**6, ops=ops, no_exchange=not exchange)
    shutil.copytree(pristine, work)
    probe = harness.run(call, [source, work / "out", "--overwrite"], kill=count)
    assert probe["code"] == 0 and probe["events"], probe["output"]
    for nth in range(1, probe["events"] + 1):
        shutil.rmtree(work)
        shutil.copytree(pristine, work)
        killed = harness.run(call, [source, work / "out", "--overwrite"], kill={**count, "nth": nth})
        assert killed["status"] == "killed", (nth, killed["output"])
        if exchange or (work / "out").exists():
            assert_complete_folder(work / "out", names)
        else:  # two renames: killed between them, the old folder waits under a hidden name
            (aside,) = [p for p in work.iterdir() if p.name.startswith(".out.old-")]
            assert_complete_folder(aside, names)
        again = harness.run(call, [source, work / "out", "--overwrite"])
        assert again["code"] == 0, (nth, again["output"])
        assert_complete_folder(work / "out", names)
        assert hidden(work) == [], nth


@pytest.mark.parametrize("writer", ["convert", "export", "warm_start"])
def test_a_killed_write_leaves_nothing_behind_after_the_next_run(harness, sources, tmp_path, writer):
    call, source = sources[writer]
    kill = dict(on="fs", under=str(tmp_path), match="model.safetensors", nth=1, when="after")
    killed = harness.run(call, [source, tmp_path / "out"], kill=kill)
    assert killed["status"] == "killed", killed["output"]
    assert not (tmp_path / "out").exists()
    done = harness.run(call, [source, tmp_path / "out"])
    assert done["code"] == 0, done["output"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- another program writes meanwhile
def _writes_into(folder: Path, original):
    """`original` (a save or validation call) that first drops a file into `folder`, as another program might
    while the writer works."""

    def call(*args, **kwargs):
        folder.mkdir(exist_ok=True)
        (folder / "other.txt").write_text("written by another program")
        return original(*args, **kwargs)

    return call


def test_convert_never_deletes_what_another_program_wrote(sources, tmp_path, monkeypatch):
    from modeling_deft_llava.commands.convert import convert

    from modeling_deft_llava import DeftLlavaForConditionalGeneration

    out = tmp_path / "out"
    out.mkdir()  # empty: convert may use it
    save = DeftLlavaForConditionalGeneration.save_pretrained
    monkeypatch.setattr(DeftLlavaForConditionalGeneration, "save_pretrained", _writes_into(out, save))
    with pytest.raises(ValueError, match="not empty"):
        convert(str(sources["convert"][1]), str(out), use_deft=True)
    assert (out / "other.txt").read_text() == "written by another program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_never_deletes_what_another_program_wrote(sources, tmp_path):
    from modeling_deft_llava import DeftLlavaForConditionalGeneration, DeftLlavaProcessor

    out = tmp_path / "out"
    out.mkdir()
    model = DeftLlavaForConditionalGeneration.from_pretrained(sources["export"][1])
    processor = DeftLlavaProcessor.from_pretrained(sources["export"][1])
    processor.save_pretrained = _writes_into(out, processor.save_pretrained)
    with pytest.raises(FileExistsError, match="not empty"):
        export_for_hub(model, processor, out)
    assert (out / "other.txt").read_text() == "written by another program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_publish_dry_run_never_deletes_what_another_program_wrote(sources, tmp_path):
    from modeling_deft_llava.hub_card.publish import PublishError, build_hub_folder

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PublishError, match="not empty"):
        build_hub_folder(sources["export"][1], out, "a/b", validator=_writes_into(out, lambda *a: None))
    assert (out / "other.txt").read_text() == "written by another program"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ----------------------------------------------------------------------------- publish killed while validating
def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


def test_a_killed_publish_stops_its_validation_and_leaves_nothing(harness, sources, tmp_path):
    from modeling_deft_llava.hub_card.publish import build_hub_folder

    scratch, pidfile, out = tmp_path / "tmp", tmp_path / "child.pid", tmp_path / "site" / "out"
    scratch.mkdir()
    kill = dict(on="spawn", pidfile=str(pidfile), delay=1.0)
    killed = harness.run(
        "modeling_deft_llava.hub_card.publish:main",
        [sources["export"][1], "a/b", "--dry-run", out],
        kill=kill,
        tmpdir=str(scratch),
    )
    assert killed["status"] == "killed", killed["output"]
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 20
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child), "the validation child outlived the killed publish"
    site = out.parent
    assert not any(site.rglob("validation.pt")), "the validation ran to its end"
    assert sorted(scratch.iterdir()) == []  # the child's temporary home is gone with it
    # the next publish into the same folder removes the killed one's staging folder
    build_hub_folder(sources["export"][1], out, "a/b", validator=lambda *a: None)
    assert sorted(p.name for p in site.iterdir()) == ["out"]
