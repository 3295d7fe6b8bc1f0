"""The model card: metadata, the settings table mirrors the config, results only when given, a working snippet."""

from __future__ import annotations

import re

import pytest
import tiny
from huggingface_hub import ModelCard, ModelCardData
from modeling_deft_llava.configuration.deft_settings import DeftSettings
from modeling_deft_llava.hub_card import isolated_check
from modeling_deft_llava.hub_card.export import export_for_hub
from modeling_deft_llava.hub_card.model_card import CITATION, TAGS, build_model_card

BASE = "llava-hf/llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def config():
    return tiny.config(use_deft=True, deft_retention_ratio=0.25, deft_alpha_var=0.3)


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, title
    return match.group(1)


def test_metadata_is_valid_model_card_data(config, tmp_path):
    card = build_model_card(config, None, BASE, license="mit")
    path = tmp_path / "README.md"
    card.save(path)
    loaded = ModelCard.load(path)  # parses the YAML header back
    data = loaded.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "image-text-to-text"
    assert data["base_model"] == BASE
    assert data["license"] == "mit"
    assert {"deft", "llava", "token-compression"} <= set(data["tags"]) and set(TAGS) <= set(data["tags"])
    assert ModelCardData(**data).to_dict() == data  # round-trips through the huggingface_hub schema
    assert str(loaded).startswith("---\n") and loaded.text.lstrip().startswith("# ")


def test_no_base_model_means_no_base_model_key(config):
    card = build_model_card(config, None, None)
    assert "base_model" not in card.data.to_dict()
    assert card.data.license == "apache-2.0"


def test_settings_table_lists_every_deft_field_with_its_config_value(config):
    table = _section(str(build_model_card(config, None, None)), "Compression settings")
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, re.M))
    for name in (*DeftSettings.field_names(), "compression_method", "compression_settings"):
        assert name in rows, name
    assert rows["deft_retention_ratio"] == "0.25"
    assert rows["deft_alpha_var"] == "0.3"
    assert rows["use_deft"] == "true"
    assert rows["deft_inference_mode"] == '"fast"'
    assert rows["compression_settings"] == "null"
    # every row has a non-empty meaning taken from the DeftSettings docstring
    for line in table.splitlines():
        if line.startswith("| `"):
            assert line.rstrip(" |").split(" | ")[-1].strip(), line


def test_budget_sentence_uses_the_config(config):
    text = str(build_model_card(config, None, None))
    assert "16 patch tokens, of which the language model sees 4" in text  # 4 = 0.25 * (32 // 8) ** 2
    off = str(build_model_card(tiny.config(use_deft=False), None, None))
    assert "Compression is off" in off


def test_no_results_means_no_numbers(config):
    results = _section(str(build_model_card(config, None, BASE)), "Results")
    assert "No measured results are attached" in results
    assert not re.search(r"\d", results), results
    limitations = _section(str(build_model_card(config, None, BASE)), "Limitations")
    assert "No accuracy or speed numbers are claimed" in limitations


def test_results_table_shows_exactly_the_given_values(config):
    flat = {"digits accuracy": 0.9517, "visual tokens": 16}
    text = _section(str(build_model_card(config, flat, BASE)), "Results")
    assert "| digits accuracy | 0.9517 |" in text and "| visual tokens | 16 |" in text
    assert "No measured results" not in text

    nested = {"deft 25%": {"accuracy": 0.93, "speedup": 1.7}, "full": {"accuracy": 0.95}}
    text = _section(str(build_model_card(config, nested, BASE)), "Results")
    assert "|  | accuracy | speedup |" in text
    assert "| deft 25% | 0.93 | 1.7 |" in text and "| full | 0.95 |  |" in text


@pytest.mark.parametrize(
    "results", [{}, {"a": {"x": 1}, "b": 2}, {"acc": float("nan")}, [("acc", 0.9)]], ids=str
)
def test_bad_results_are_refused(config, results):
    with pytest.raises(ValueError):
        build_model_card(config, results, None)


def test_citation_and_trust_remote_code_advice(config):
    text = str(build_model_card(config, None, None, repo_id="me/deft", revision="0123abc"))
    assert CITATION in _section(text, "Citation")
    usage = _section(text, "Usage")
    assert usage.count("trust_remote_code=True") >= 2
    assert 'revision = "0123abc"' in usage and 'repo_id = "me/deft"' in usage
    assert "commit sha" in usage


def test_usage_snippet_runs_as_written_without_the_project(tmp_path):
    """Export a tiny model, put its folder in the snippet as the repo id, run the snippet in `python -I`."""
    model = tiny.model(use_deft=True)
    model.generation_config.suppress_tokens = [0, 1, 2, 3, 4, 5]  # special tokens: the answer is words
    folder = export_for_hub(model, tiny.processor(use_deft=True), tmp_path / "repo")
    card = build_model_card(model.config, None, None, repo_id=str(folder))
    (snippet,) = re.findall(r"```python\n(.*?)```", str(card), re.S)
    work = tmp_path / "user"
    work.mkdir()
    tiny.images(1)[0].save(work / "example.jpg")
    (work / "snippet.py").write_text(snippet)
    proc = isolated_check.run_isolated_script(work / "snippet.py", cwd=work, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.strip().splitlines()
    assert len(printed) == 1 and len(printed[0].split()) == 32, proc.stdout  # max_new_tokens=32 words


def test_card_states_the_supported_versions(config):
    from modeling_deft_llava.configuration.supported_versions import (
        PEFT_BELOW,
        PEFT_MIN,
        supported_transformers_range,
    )

    usage = _section(str(build_model_card(config, None, None)), "Usage")
    assert f"`transformers{supported_transformers_range()}`" in usage
    assert f"`peft>={PEFT_MIN},<{PEFT_BELOW}`" in usage
