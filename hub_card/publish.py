"""Publish a DeFT-LLaVA folder to the Hugging Face Hub, or write exactly what would be published.

    python -m modeling_deft_llava.hub_card.publish FOLDER REPO_ID [--private] [--revision BRANCH]
        [--commit-message MSG] [--dry-run OUT] [--base-model ID] [--results results.json] [--license ID]

Steps, and where each can stop (nothing reaches the Hub before the last one):

1. check the token (`huggingface_hub.get_token()`; skipped for `--dry-run`) and the folder's files;
2. load the model and processor from FOLDER and build the Hub folder: `export_for_hub` + README.md model card;
3. validate it: load it with every Auto class and the pipeline in an isolated `python -I` without this project
   (`isolated_check.py`);
4. `--dry-run OUT`: move the validated folder to OUT and stop. Otherwise: `create_repo(exist_ok=True)`, create
   the branch `--revision` if it is not `main`, and upload every file in ONE commit (`create_commit`).

Why one `create_commit` and not `upload_folder`: with `hf_xet` installed (a huggingface_hub dependency),
`upload_folder` streams large folders in several commits, so a failure can leave the repository half-updated;
one commit is all or nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError

from .. import DeftLlavaForConditionalGeneration, DeftLlavaProcessor
from ..utilities.atomic_write import place, staged
from .export import _folder_is_empty, export_for_hub
from .isolated_check import IsolatedCheckError, run_isolated_check
from .model_card import build_model_card

DEFAULT_COMMIT_MESSAGE = "Upload DeFT-LLaVA (trust_remote_code export)"
DEFAULT_BRANCH = "main"
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class PublishError(RuntimeError):
    """Publishing stopped before anything was uploaded; the message says why and what to do."""


def check_source_folder(folder: Path) -> None:
    """Raise `PublishError` naming what a DeFT-LLaVA folder lacks (config, weights, processor, tokenizer)."""
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    names = {p.name for p in folder.iterdir()}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") for n in names):
        missing.append("model weights (*.safetensors)")
    if not names & set(PROCESSOR_FILES):
        missing.append(" or ".join(PROCESSOR_FILES))
    if not names & set(TOKENIZER_FILES):
        missing.append(" or ".join(TOKENIZER_FILES))
    if missing:
        raise PublishError(
            f"{folder} is not a saved DeFT-LLaVA model and processor; missing: {', '.join(missing)} "
            "(save both with model.save_pretrained(folder) and processor.save_pretrained(folder))"
        )
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != "deft_llava":
        raise PublishError(f"{folder}/config.json has model_type={model_type!r}, expected 'deft_llava'")


def build_hub_folder(
    folder,
    out,
    repo_id: str,
    *,
    results: dict | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    validator=None,
) -> Path:
    """Build and validate the Hub folder of the model saved in `folder`; write it atomically to `out`.

    `validator(hub_folder, out_file)` must raise if the folder does not load without the project
    (None: `run_isolated_check`). Raises `PublishError` for a bad source folder or a failed validation."""
    validator = validator or run_isolated_check
    source, target = Path(folder), Path(out).absolute()
    check_source_folder(source)
    if not _folder_is_empty(target):
        raise PublishError(f"{target} is not empty; give a new or empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    model = DeftLlavaForConditionalGeneration.from_pretrained(source).eval()
    processor = DeftLlavaProcessor.from_pretrained(source)
    # the work folder sits next to OUT (a killed run's is removed by the next one) and holds the Hub folder
    with staged(target) as work:
        hub = export_for_hub(model, processor, work / "hub")
        card = build_model_card(model.config, results, base_model, license=license, repo_id=repo_id)
        card.save(hub / "README.md")
        try:
            validator(hub, work / "validation.pt")
        except IsolatedCheckError as err:
            raise PublishError(
                f"the exported folder failed validation; nothing was uploaded.\n{err}"
            ) from err
        try:
            place(hub, target)  # refused if another program wrote into OUT meanwhile
        except FileExistsError as err:
            raise PublishError(f"{err}; the validated folder was not written") from err
    return target


def upload_hub_folder(
    hub_folder,
    repo_id: str,
    *,
    token: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
):
    """Create the repository (and branch) and upload every file of `hub_folder` in one commit."""
    api = api or HfApi()
    files = sorted(p for p in Path(hub_folder).rglob("*") if p.is_file())
    operations = [
        CommitOperationAdd(path_in_repo=p.relative_to(hub_folder).as_posix(), path_or_fileobj=str(p))
        for p in files
    ]
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if revision and revision != DEFAULT_BRANCH:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
    return api.create_commit(
        repo_id,
        operations=operations,
        commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        revision=revision,
        repo_type="model",
        token=token,
    )


def publish(
    folder,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run=None,
    results: dict | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    token: str | None = None,
    api: HfApi | None = None,
    validator=None,
):
    """Build, validate and upload (or, with `dry_run=OUT`, only write to OUT) the Hub folder of `folder`.

    Returns the `CommitInfo` of the upload, or the OUT path for a dry run. Raises `PublishError` before
    anything is uploaded when the token is missing, the folder is incomplete or the validation fails."""
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise PublishError(f"REPO_ID must be 'namespace/name', got {repo_id!r}")
    if dry_run is not None:
        return build_hub_folder(
            folder,
            dry_run,
            repo_id,
            results=results,
            base_model=base_model,
            license=license,
            validator=validator,
        )
    token = token or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN (or use --dry-run OUT to only build "
            "the folder); nothing was uploaded"
        )
    # a locked staging folder in the temporary directory: the next publish deletes a killed one's
    with staged(Path(tempfile.gettempdir()) / "deft-publish") as tmp:
        hub = build_hub_folder(
            folder,
            tmp / "hub",
            repo_id,
            results=results,
            base_model=base_model,
            license=license,
            validator=validator,
        )
        return upload_hub_folder(
            hub,
            repo_id,
            token=token,
            private=private,
            revision=revision,
            commit_message=commit_message,
            api=api,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_deft_llava.hub_card.publish",
        description="Publish a saved DeFT-LLaVA model + processor folder to the Hugging Face Hub "
        "(flat trust_remote_code export, model card, isolated validation, one commit).",
    )
    parser.add_argument("folder", type=Path, help="folder with the saved model and processor")
    parser.add_argument("repo_id", help="target repository, 'namespace/name'")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--revision", help=f"branch to commit to (default {DEFAULT_BRANCH}; created if missing)"
    )
    parser.add_argument("--commit-message", help=f"default: {DEFAULT_COMMIT_MESSAGE!r}")
    parser.add_argument(
        "--dry-run", type=Path, metavar="OUT", help="write what would be uploaded to OUT; upload nothing"
    )
    parser.add_argument("--base-model", help="Hub id of the base model (model card metadata)")
    parser.add_argument("--results", type=Path, help="JSON file of measured results for the model card")
    parser.add_argument("--license", default="apache-2.0", help="Hub license id (default apache-2.0)")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8")) if args.results else None
        outcome = publish(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
            results=results,
            base_model=args.base_model,
            license=args.license,
        )
    except (PublishError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except HfHubHTTPError as err:  # the Hub refused a request; a commit is all or nothing
        print(f"error: the Hub refused the upload (no partial commit was made): {err}", file=sys.stderr)
        return 1
    if args.dry_run is not None:
        print(f"dry run: the validated Hub folder is in {outcome}; nothing was uploaded")
    else:
        print(f"uploaded: {outcome.commit_url}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
