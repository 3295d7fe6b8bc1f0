"""The flat Hub export: layout, code audit, atomic writes, and the isolated `trust_remote_code` round trip."""

from __future__ import annotations

import ast
import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from modeling_deft_llava.hub_card import isolated_check
from modeling_deft_llava.hub_card.code_audit import ALLOWED_PACKAGES, audit_published_code
from modeling_deft_llava.hub_card.export import (
    MODEL_AUTO_MAP,
    PROCESSOR_AUTO_MAP,
    collect_code_files,
    export_for_hub,
    flatten_imports,
)
from modeling_deft_llava.processing.image_depth import to_rgb
from PIL import Image
from transformers import pipeline

MAX_NEW_TOKENS = 4
PROMPT = tiny.prompt()
# special tokens (<pad> <unk> <s> </s> <image> <video>) suppressed, so the greedy text is real words: this
# also proves that generation_config.json travels with the export
SUPPRESS = [0, 1, 2, 3, 4, 5]
# the in-repo reference and the isolated child compute with the same thread count: another count sums in another
# order, and the comparison is bit-exact (before: a test that changed this process's count failed it)
THREADS = 1


@contextlib.contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny `use_deft=True` model and processor, exported; the in-repo outputs for one fixed input."""
    root = tmp_path_factory.mktemp("hub")
    model = tiny.model(use_deft=True)
    model.generation_config.suppress_tokens = SUPPRESS
    processor = tiny.processor(use_deft=True)
    image_path = root / "image.png"
    # a 16-bit grey PNG (lossless, so both sides see the same pixels): the isolated child must convert it as the
    # shipped processor does (scaled to 8 bits, not clipped)
    ramp = np.linspace(0, 65535, tiny.IMAGE_SIZE**2).round().astype(np.uint16).reshape(tiny.IMAGE_SIZE, -1)
    Image.fromarray(ramp).save(image_path)
    image = to_rgb(Image.open(image_path))

    config_before = model.config.to_dict()
    folder = export_for_hub(model, processor, root / "tiny-deft-llava")

    inputs = processor(images=[image], text=[PROMPT], return_tensors="pt")
    with torch.no_grad(), _threads(THREADS):
        reference = {
            "input_ids": inputs["input_ids"],
            "logits": model(**inputs).logits,
            "generated": model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
            "base_last_hidden_state": model.model(**inputs).last_hidden_state,
        }
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    with _threads(THREADS):
        out = pipe(
            images=image,
            text=PROMPT,
            generate_kwargs=dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False),
            return_full_text=False,
        )
    reference["pipeline_text"] = out[0]["generated_text"]
    return dict(
        folder=folder,
        root=root,
        model=model,
        processor=processor,
        image_path=image_path,
        reference=reference,
        config_before=config_before,
    )


@pytest.fixture(scope="module")
def isolated(exported):
    """Load the exported folder in `python -I` without the project; its outputs for the same input."""
    out = exported["root"] / "isolated.pt"
    summary = isolated_check.run_isolated_check(
        exported["folder"],
        out,
        image=exported["image_path"],
        prompt=PROMPT.replace("<image>", "{image}"),
        max_new_tokens=MAX_NEW_TOKENS,
        threads=THREADS,
    )
    return summary, torch.load(out, weights_only=True)


# ------------------------------------------------------------------------------------------ layout
def test_export_is_flat_safetensors_with_auto_maps(exported):
    folder = exported["folder"]
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "processor_config.json", "model.safetensors"} <= names
    assert {"modeling_deft_llava.py", "configuration_deft_llava.py", "processing_deft_llava.py"} <= names
    assert "deft_settings.py" in names and "deft_module.py" in names  # followed through relative imports
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert "__init__.py" not in names  # the Auto-class registration is replaced by auto_map
    assert not [p for p in folder.iterdir() if p.is_dir()]  # flat

    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == MODEL_AUTO_MAP
    assert config["model_type"] == "deft_llava" and config["use_deft"] is True
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == PROCESSOR_AUTO_MAP
    assert processor_config["use_deft"] is True
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["suppress_tokens"] == SUPPRESS


def test_every_auto_map_target_exists_in_the_folder(exported):
    folder = exported["folder"]
    for target in [*MODEL_AUTO_MAP.values(), *PROCESSOR_AUTO_MAP.values()]:
        module, cls = target.split(".")
        tree = ast.parse((folder / f"{module}.py").read_text())
        assert cls in {n.name for n in tree.body if isinstance(n, ast.ClassDef)}, target


def test_relative_imports_are_flat_and_resolve_in_the_folder(exported):
    folder = exported["folder"]
    local = {p.stem for p in folder.glob("*.py")}
    for path in folder.glob("*.py"):
        text = path.read_text()
        # the form the transformers dynamic-module loader follows, and nothing else
        assert not re.search(r"^\s*from\s+\.\.", text, re.M), path.name
        assert not re.search(r"^\s*from\s+\.\s+import", text, re.M), path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module in local, (path.name, node.module)


def test_export_leaves_the_callers_config_alone(exported):
    model = exported["model"]
    assert getattr(model.config, "auto_map", None) is None
    after = model.config.to_dict()
    before = exported["config_before"]
    # save_pretrained itself records dtype and architectures; nothing else may change
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= {"dtype", "architectures"}, changed


# ------------------------------------------------------------------------------------------ code audit
def test_published_code_imports_only_the_allow_list(exported):
    """Parse every exported file: imports from the allow-list or the standard library, no eval/exec/pickle,
    no network modules."""
    allowed = set(ALLOWED_PACKAGES) | set(sys.stdlib_module_names) | {"__future__"}
    network_or_pickle = {
        "socket",
        "ssl",
        "http",
        "urllib",
        "requests",
        "httpx",
        "pickle",
        "marshal",
        "shelve",
    }
    for path in exported["folder"].glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                tops = []
            for top in tops:
                assert top in allowed and top not in network_or_pickle, (path.name, node.lineno, top)
            if isinstance(node, ast.Name):
                assert node.id not in {"eval", "exec", "compile", "__import__"}, (path.name, node.lineno)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) != ("torch", "load"), (path.name, node.lineno)
    assert audit_published_code(exported["folder"]) == []


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("import requests\n", "outside the allow-list"),
        ("import urllib.request\n", "forbidden module"),
        ("from pickle import loads\n", "forbidden module"),
        ("x = eval('1')\n", "eval"),
        ("import builtins\nbuiltins.exec('1')\n", ".exec"),
        ("import torch\nstate = torch.load('w.bin')\n", "torch.load"),
        ("from huggingface_hub import hf_hub_download\n", "network"),
        ("from ..configuration.deft_settings import X\n", "relative import"),
        ("from .missing_module import X\n", "not in the folder"),
    ],
)
def test_audit_catches_unsafe_code(tmp_path, source, fragment):
    (tmp_path / "bad.py").write_text(source)
    problems = audit_published_code(tmp_path)
    assert problems and any(fragment in p for p in problems), problems


# Each runs code, reaches the network or the file system, or unpickles, and none is needed by a model's code.
RISKY = {
    "os.system": "import os\nos.system('id')\n",
    "from os import system": "from os import system\nsystem('id')\n",
    "os.popen": "import os\nos.popen('id')\n",
    "os.environ write": "import os\nos.environ['HF_ENDPOINT'] = 'http://x'\n",
    "from torch import load": "from torch import load\nload('w.bin')\n",
    "torch alias .load": "import torch as t\nt.load('w.bin')\n",
    "torch.serialization.load": "from torch.serialization import load\nload('w.bin')\n",
    "torch.hub.load": "import torch\ntorch.hub.load('someone/repo', 'model')\n",
    "torch.jit.load": "import torch\ntorch.jit.load('m.pt')\n",
    "torch.ops.load_library": "import torch\ntorch.ops.load_library('x.so')\n",
    "cpp_extension": "from torch.utils.cpp_extension import load_inline\n",
    "np.load pickle": "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n",
    "getattr on a module": "import torch\ngetattr(torch, 'lo' + 'ad')('w.bin')\n",
    "module as a value": "import torch\nm = torch\nm.load('w.bin')\n",
    "importlib": "import importlib\nimportlib.import_module('subprocess')\n",
    "builtins module": "import builtins\nbuiltins.eval('1')\n",
    "__builtins__": "__builtins__['ev' + 'al']('1')\n",
    "subclasses walk": "x = ().__class__.__base__.__subclasses__()\n",
    "globals()": "globals()['__builtins__']\n",
    "open": "open('/tmp/x', 'w').write('x')\n",
    "pathlib write": "from pathlib import Path\nPath('/tmp/x').write_text('x')\n",
    "shutil.rmtree": "import shutil\nshutil.rmtree('/tmp/x')\n",
    "sys.modules": "import sys\nsys.modules['torch'] = None\n",
    "from_pretrained of another repo": (
        "from transformers import AutoModel\nAutoModel.from_pretrained('someone/else', trust_remote_code=True)\n"
    ),
    "transformers cached_file": "from transformers.utils import cached_file\n",
    "hf_hub_download": "from huggingface_hub import hf_hub_download\n",
    "PIL plugin loading": "from PIL import Image\nImage.open('x.png')\n",
}


@pytest.mark.parametrize("name", sorted(RISKY))
def test_audit_refuses_risky_constructs(tmp_path, name):
    (tmp_path / "bad.py").write_text(RISKY[name])
    assert audit_published_code(tmp_path), f"{name} passed the audit"


# ------------------------------------------------------------------------------------------ flattening
def test_collect_code_files_follows_lazy_imports():
    found = collect_code_files()
    stems = {stem for stem, _ in found.values()}
    # the placeholder policy sits under compressors/, which the config imports
    assert {"modeling_deft_llava", "configuration_deft_llava", "processing_deft_llava"} <= stems
    assert {"deft_settings", "placeholder_policy", "deft_module", "topk_selector"} <= stems
    assert "__init__" not in stems and "demo" not in stems


def test_flatten_imports_rewrites_every_relative_form():
    source = textwrap.dedent(
        """\
        from __future__ import annotations
        from ..configuration.deft_settings import A, B
        from .deft_module import (
            C,
        )


        def f():
            from ..configuration.method_validation import validate_method  # lazy

            return validate_method
        """
    )
    flat = {
        "modeling_deft_llava.configuration.deft_settings": "deft_settings",
        "modeling_deft_llava.processing.deft_module": "deft_module",
        "modeling_deft_llava.configuration.method_validation": "method_validation",
    }
    out = flatten_imports(source, "modeling_deft_llava.processing.x", flat)
    assert "from .deft_settings import A, B" in out
    assert "from .deft_module import (\n    C,\n)" in out
    assert "    from .method_validation import validate_method  # lazy" in out
    assert "from __future__ import annotations" in out
    ast.parse(out)


def test_flatten_refuses_unexported_modules():
    with pytest.raises(ValueError, match="not exported"):
        flatten_imports("from .elsewhere import X\n", "modeling_deft_llava.modeling_deft_llava", {})


# ------------------------------------------------------------------------------------------ atomic writes
def test_export_refuses_a_non_empty_folder_and_overwrites_on_request(exported, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        export_for_hub(exported["model"], exported["processor"], target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    export_for_hub(exported["model"], exported["processor"], target, overwrite=True)
    names = {p.name for p in target.iterdir()}
    assert "keep.txt" not in names and "model.safetensors" in names
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or backup folder left behind


class _FailingProcessor:
    def save_pretrained(self, folder):
        (Path(folder) / "half-written.json").write_text("{")
        raise RuntimeError("disk full")


def test_failed_export_leaves_nothing_behind(exported, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        export_for_hub(exported["model"], _FailingProcessor(), target)
    assert list(tmp_path.iterdir()) == []

    target.mkdir()
    (target / "old.txt").write_text("previous export")
    with pytest.raises(RuntimeError, match="disk full"):
        export_for_hub(exported["model"], _FailingProcessor(), target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["old.txt"]  # the old folder survives a failed overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# ------------------------------------------------------------------------------------------ isolation
def _find_spec_in_child(strip: bool) -> str:
    code = "import importlib.util\n"
    if strip:
        code += (
            "import sys\nsys.path.insert(0, sys.argv[1])\nimport isolated_check as c\nsys.path.pop(0)\n"
            "c._strip_project(sys.argv[2:], block=False)\n"
        )
    code += "print(importlib.util.find_spec('modeling_deft_llava') is not None)"
    script_dir = str(Path(isolated_check.__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code, script_dir, *isolated_check.project_roots()],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_isolated_check_refuses_a_bad_thread_count(threads, tmp_path):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        isolated_check.run_isolated_check(tmp_path, tmp_path / "out.pt", threads=threads)


def test_plain_python_I_still_sees_the_editable_install_but_the_stripped_child_does_not():
    """`-I` alone is not isolation here (the editable finder lives in site-packages); the strip is."""
    assert _find_spec_in_child(strip=False) == "True"
    assert _find_spec_in_child(strip=True) == "False"


def test_isolated_load_uses_remote_code_for_every_auto_class(isolated):
    summary, _ = isolated
    assert summary["project_importable"] is False
    expected = {
        "config_class": "configuration_deft_llava.DeftLlavaConfig",
        "processor_class": "processing_deft_llava.DeftLlavaProcessor",
        "causal_lm_class": "modeling_deft_llava.DeftLlavaForConditionalGeneration",
        "image_text_to_text_class": "modeling_deft_llava.DeftLlavaForConditionalGeneration",
        "base_class": "modeling_deft_llava.DeftLlavaModel",
        "pipeline_model_class": "modeling_deft_llava.DeftLlavaForConditionalGeneration",
    }
    for key, suffix in expected.items():
        assert summary[key].startswith("transformers_modules."), (key, summary[key])
        assert summary[key].endswith(suffix), (key, summary[key])


def test_isolated_outputs_equal_the_in_repo_model(exported, isolated):
    summary, remote = isolated
    assert summary["threads"] == THREADS  # both sides sum in the same order
    reference = exported["reference"]
    assert torch.equal(remote["input_ids"], reference["input_ids"])  # the remote processor: same placeholders
    # K = 8 of 16 patches: the compressed prompt is shorter than the uncompressed one
    assert int((reference["input_ids"] == 4).sum()) == tiny.config(use_deft=True).num_kept_tokens(16) == 8
    for name in ("causal_lm", "image_text_to_text"):
        assert torch.equal(remote[f"{name}_logits"], reference["logits"]), name
        assert torch.equal(remote[f"{name}_generated"], reference["generated"]), name
    assert reference["generated"].shape[1] == reference["input_ids"].shape[1] + MAX_NEW_TOKENS
    assert torch.equal(remote["base_last_hidden_state"], reference["base_last_hidden_state"])
    assert reference["pipeline_text"].strip()  # real words, not an empty string
    assert remote["pipeline_text"] == reference["pipeline_text"]


# ------------------------------------------------------------------------------------------ publishing
class _HubStandIn(http.server.BaseHTTPRequestHandler):
    """The few Hub endpoints `create_repo`, `create_branch` and `create_commit` use, recorded per request.

    preupload answers "regular" for every file, so the commit carries the files inline (base64 in the
    NDJSON body); the LFS/xet upload protocol is not exercised."""

    requests: list  # set per server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        record = {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        self.server.requests.append(record)
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            return self._json({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._json({"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            return self._json(
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                }
            )
        if "/branch/" in path:
            return self._json({})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            record["files"] = {
                line["value"]["path"]: base64.b64decode(line["value"]["content"])
                for line in lines
                if line["key"] == "file"
            }
            record["header"] = next(line["value"] for line in lines if line["key"] == "header")
            repo_id = path.split("/api/models/")[1].split("/commit/")[0]
            url = f"http://{self.headers['Host']}/{repo_id}/commit/{'a' * 40}"
            return self._json({"commitUrl": url, "commitOid": "a" * 40})
        self.send_response(404)
        self.end_headers()

    def _json(self, data):
        raw = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


@contextlib.contextmanager
def _running_stand_in():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStandIn)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub_server():
    with _running_stand_in() as running:
        yield running


@pytest.fixture(scope="module")
def saved_source(exported):
    """An ordinary in-repo save of the tiny model and processor: what a user would publish."""
    source = exported["root"] / "source"
    exported["model"].save_pretrained(source)
    exported["processor"].save_pretrained(source)
    return source


def _publish_cli(args, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "modeling_deft_llava.hub_card.publish", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cli_upload(saved_source, tmp_path_factory):
    """`python -m ...publish` (real validation) against the stand-in; the requests the Hub received."""
    tmp = tmp_path_factory.mktemp("cli")
    with _running_stand_in() as (server, endpoint):
        proc = _publish_cli(
            [saved_source, "someone/tiny-deft", "--private", "--revision", "v1", "--commit-message", "first"],
            {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_standin", "HF_HOME": str(tmp / "home")},
            tmp,
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return server


def test_publish_command_uploads_the_validated_folder_in_one_commit(cli_upload):
    """The real huggingface_hub client, through HF_ENDPOINT, against a local stand-in of the Hub."""
    server = cli_upload
    paths = [r["path"].split("?")[0] for r in server.requests]
    assert paths[0] == "/api/repos/create"
    assert json.loads(server.requests[0]["body"]) == {
        "name": "tiny-deft",
        "organization": "someone",
        "visibility": "private",
        "type": "model",
    }
    assert "/api/models/someone/tiny-deft/branch/v1" in paths
    commits = [r for r in server.requests if "/commit/" in r["path"]]
    assert len(commits) == 1 and commits[0]["path"].startswith("/api/models/someone/tiny-deft/commit/v1")
    assert all(r["auth"] == "Bearer hf_standin" for r in server.requests)
    commit = commits[0]
    assert commit["header"]["summary"] == "first"
    uploaded = commit["files"]
    assert {"README.md", "config.json", "model.safetensors", "modeling_deft_llava.py"} <= set(uploaded)
    assert json.loads(uploaded["config.json"])["auto_map"] == MODEL_AUTO_MAP
    assert "trust_remote_code=True" in uploaded["README.md"].decode()
    assert 'repo_id = "someone/tiny-deft"' in uploaded["README.md"].decode()


def test_publish_without_a_token_uploads_nothing(saved_source, hub_server, tmp_path):
    server, endpoint = hub_server
    proc = _publish_cli(
        [saved_source, "someone/tiny-deft"],
        {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "empty-home")},  # no HF_TOKEN, no token file
        tmp_path,
    )
    assert proc.returncode == 1
    assert "no Hugging Face token" in proc.stderr
    assert server.requests == []


def test_publish_with_a_failed_validation_uploads_nothing(saved_source, hub_server, tmp_path):
    from huggingface_hub import HfApi
    from modeling_deft_llava.hub_card.publish import PublishError, publish

    server, endpoint = hub_server

    def failing_validator(folder, out):
        raise isolated_check.IsolatedCheckError("AutoModel could not load the folder")

    with pytest.raises(PublishError, match="failed validation; nothing was uploaded"):
        publish(
            saved_source,
            "someone/tiny-deft",
            token="hf_standin",
            api=HfApi(endpoint=endpoint),
            validator=failing_validator,
        )
    assert server.requests == []
    assert [p for p in tmp_path.iterdir()] == []


def test_a_killed_publish_leaves_no_temporary_folder_behind(saved_source, hub_server, tmp_path, monkeypatch):
    """A publish killed while uploading leaves its working folder in the temporary directory; the next
    publish deletes it (its writer is gone) and its own on the way out."""
    import tempfile

    from huggingface_hub import HfApi
    from modeling_deft_llava.hub_card.publish import PublishError, publish

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    (scratch / ".deft-publish.staging-killed" / "hub").mkdir(parents=True)  # what a killed publish left

    def failing_validator(folder, out):
        raise isolated_check.IsolatedCheckError("stop before the upload")

    with pytest.raises(PublishError):
        publish(
            saved_source,
            "someone/tiny-deft",
            token="hf_standin",
            api=HfApi(endpoint=hub_server[1]),
            validator=failing_validator,
        )
    assert sorted(scratch.iterdir()) == []


def test_the_validator_rejects_a_broken_export(exported, tmp_path):
    """The real isolated check fails on a folder whose code does not import without the project."""
    broken = tmp_path / "broken"
    shutil.copytree(exported["folder"], broken)
    (broken / "deft_settings.py").unlink()  # a file the config imports
    with pytest.raises(isolated_check.IsolatedCheckError, match="deft_settings"):
        isolated_check.run_isolated_check(broken, tmp_path / "out.pt", timeout=120)


def test_publish_refuses_incomplete_folders(tmp_path):
    from modeling_deft_llava.hub_card.publish import PublishError, publish

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deft_llava"}))
    with pytest.raises(PublishError, match=r"model weights \(\*\.safetensors\)"):
        publish(tmp_path, "someone/x", dry_run=tmp_path / "out")
    with pytest.raises(PublishError, match="namespace/name"):
        publish(tmp_path, "no-namespace", dry_run=tmp_path / "out")


def test_dry_run_writes_exactly_the_upload_and_contacts_nothing(
    saved_source, cli_upload, hub_server, tmp_path
):
    from modeling_deft_llava.hub_card.publish import publish

    server, _ = hub_server
    out = publish(
        saved_source,
        "someone/tiny-deft",
        dry_run=tmp_path / "out",
        validator=lambda folder, out: None,  # the real validation runs in the command test
    )
    assert server.requests == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # byte for byte what the command uploaded from the same source folder
    (commit,) = [r for r in cli_upload.requests if "/commit/" in r["path"]]
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert written.keys() == commit["files"].keys()
    for name, data in written.items():
        assert data == commit["files"][name], name


def test_dry_run_command_validates_and_carries_given_results(saved_source, tmp_path):
    from modeling_deft_llava.hub_card.publish import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps({"digits accuracy": 0.5}))
    out = tmp_path / "out"
    assert main([str(saved_source), "a/b", "--dry-run", str(out), "--results", str(results)]) == 0
    assert "| digits accuracy | 0.5 |" in (out / "README.md").read_text()
    assert main([str(saved_source), "a/b", "--dry-run", str(out)]) == 1  # never overwrites OUT


_FAKE_VERSION_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import isolated_check as c
    sys.path.pop(0)
    c._strip_project(sys.argv[4:], block=False)
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    import transformers  # after the Auto imports, which can replace the module object in sys.modules
    transformers.__version__ = sys.argv[3]
    try:
        AutoConfig.from_pretrained(sys.argv[2], trust_remote_code=True)
        AutoProcessor.from_pretrained(sys.argv[2], trust_remote_code=True)
        AutoModelForImageTextToText.from_pretrained(sys.argv[2], trust_remote_code=True)
        print("LOADED")
    except ImportError as error:
        print("IMPORT-ERROR:", error)
    """
)


def _load_with_fake_version(exported, tmp_path, fake_version) -> subprocess.CompletedProcess:
    script_dir = str(Path(isolated_check.__file__).parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    return subprocess.run(
        [sys.executable, "-I", "-c", _FAKE_VERSION_CHILD, script_dir, str(exported["folder"]), fake_version]
        + isolated_check.project_roots(),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.parametrize("fake_version", ["5.16.1", "5.17.0"])
def test_exported_code_refuses_a_too_old_transformers_at_import(exported, tmp_path, fake_version):
    """The Hub folder's own code checks the installed transformers before anything runs."""
    from modeling_deft_llava.configuration.supported_versions import supported_transformers_range

    proc = _load_with_fake_version(exported, tmp_path, fake_version)
    assert (
        f"IMPORT-ERROR: DeFT-LLaVA supports transformers {supported_transformers_range()}" in proc.stdout
    ), proc.stdout + proc.stderr[-2000:]
    assert f"transformers {fake_version} is installed" in proc.stdout


@pytest.mark.parametrize("fake_version", ["5.99.0", "6.0.0"])
def test_exported_code_warns_once_and_loads_under_a_newer_transformers(exported, tmp_path, fake_version):
    """A folder exported today must not refuse every later transformers release: config, processor and model
    load, with one warning that names the tested range."""
    from modeling_deft_llava.configuration.supported_versions import supported_transformers_range

    proc = _load_with_fake_version(exported, tmp_path, fake_version)
    assert "LOADED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    warned = [line for line in proc.stderr.splitlines() if "is newer and untested" in line]
    assert len(warned) == 1, proc.stderr[-3000:]
    assert f"transformers {fake_version} is newer and untested" in warned[0]
    assert supported_transformers_range() in warned[0]
