"""The supported transformers/peft range: one source, stated in pyproject, guarded at import; version shims."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import transformers
from modeling_deft_llava.configuration import supported_versions as sv
from transformers.cache_utils import DynamicCache

from modeling_deft_llava import DeFTModule
from modeling_deft_llava.transformers_compat import CACHE_NAME, cache_of, resolve_cache_argument, rewind_cache

ROOT = Path(__file__).resolve().parents[1]


def _requirement(name: str) -> str:
    # tomllib is 3.11+ and the project supports 3.10: the dependency lines are plain `"name<spec>",`
    found = re.findall(rf'^\s*"{name}([<>=!~][^"]*)",$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert len(found) == 1, found
    return found[0].replace(" ", "")


def test_pyproject_states_the_tested_range():
    assert _requirement("transformers") == sv.supported_transformers_range()
    assert _requirement("peft") == f">={sv.PEFT_MIN},<{sv.PEFT_BELOW}"


def test_ci_tests_the_lowest_versions():
    lowest = (ROOT / ".ci" / "requirements-lowest.txt").read_text()
    assert f"transformers=={sv.TRANSFORMERS_MIN}\n" in lowest
    assert f"peft=={sv.PEFT_MIN}\n" in lowest


def test_the_installed_transformers_is_supported():
    sv.check_transformers_version()  # the suite itself runs inside the range


@pytest.mark.parametrize("version", ["5.16.1", "5.17.0", "5.17.9", "4.57.6"])
def test_versions_below_the_minimum_raise_a_clear_import_error(version):
    with pytest.raises(ImportError) as error:
        sv.check_transformers_version(version)
    assert f"transformers {version} is installed" in str(error.value)
    assert sv.supported_transformers_range() in str(error.value)


@pytest.mark.parametrize("version", ["5.21.0", "5.21.0.dev0"])
def test_a_known_broken_release_raises_a_clear_import_error(version, monkeypatch):
    monkeypatch.setattr(sv, "KNOWN_BROKEN", {"5.21.0": "loses the adapter weights"})
    with pytest.raises(ImportError) as error:
        sv.check_transformers_version(version)
    message = str(error.value)
    assert f"transformers {version} is installed" in message and "known to break" in message
    assert "loses the adapter weights" in message and sv.supported_transformers_range() in message
    sv.check_transformers_version("5.21.1")  # only the listed release


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def version_warnings():
    """The records of the guard's logger; `warning_once`'s memory of earlier messages is cleared first."""
    logging.Logger.warning_once.cache_clear()
    handler = _Records()
    sv.logger.addHandler(handler)
    yield handler.records
    sv.logger.removeHandler(handler)


@pytest.mark.parametrize(
    "version", [sv.TRANSFORMERS_MIN, "5.24.0", "5.24.3", "5.25.0", "5.25.2", "5.24.0.dev0"]
)
def test_versions_inside_the_range_pass_silently(version, version_warnings):
    sv.check_transformers_version(version)
    assert version_warnings == []


@pytest.mark.parametrize("version", [sv.TRANSFORMERS_BELOW + ".0", "5.26.0.dev0", "5.99.0", "6.0.0"])
def test_newer_untested_releases_warn_once_and_run(version, version_warnings):
    """A newer release is not refused (an exported folder would refuse it forever): one warning per process."""
    sv.check_transformers_version(version)
    sv.check_transformers_version(version)  # the next entry module's import: no second warning
    assert [r.levelno for r in version_warnings] == [logging.WARNING]
    message = version_warnings[0].getMessage()
    assert f"transformers {version} is newer and untested" in message
    assert sv.supported_transformers_range() in message


def test_the_tested_range_includes_transformers_5_25():
    sv.check_transformers_version("5.25.0")
    assert sv.supported_transformers_range() == ">=5.18.0,<5.26"


def test_cache_name_follows_the_installed_release():
    major_minor = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    assert CACHE_NAME == ("cache" if major_minor >= (5, 24) else "past_key_values")


def test_a_cache_passed_twice_is_refused():
    one, two = DynamicCache(), DynamicCache()
    assert resolve_cache_argument(one, None) is one and resolve_cache_argument(None, two) is two
    assert resolve_cache_argument(one, one) is one
    with pytest.raises(ValueError, match="not both"):
        resolve_cache_argument(one, two)


def _filled(lengths):
    cache = DynamicCache()
    for length in lengths:
        key = torch.randn(1, 2, length, 4)
        cache.update(key, key.clone(), 0)
    return cache


def test_rewind_keeps_earlier_turns_and_drops_the_rest():
    """The `adaptive` re-run of a prefill on a reused cache: the earlier turn stays, the prefill goes.

    Before: `Cache.reset()` dropped the earlier turn too, and on transformers < 5.23 kept zeroed tensors of the
    old length, so the re-run prefill continued after zeros."""
    cache = _filled([5])
    earlier = cache.layers[0].keys.clone()
    cache.update(torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), 0)
    rewind_cache(cache, 5)
    assert cache.get_seq_length() == 5
    assert torch.equal(cache.layers[0].keys, earlier)
    rewind_cache(cache, 0)
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="cannot rewind"):
        rewind_cache(cache, 3)


def test_model_outputs_carry_the_cache_under_the_installed_name():
    import tiny

    model, processor = tiny.model(use_deft=True), tiny.processor(use_deft=True)
    inputs = processor(images=tiny.images(1), text=[tiny.prompt()], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    assert cache_of(out) is not None and cache_of(out).get_seq_length() == inputs["input_ids"].shape[1]


def test_saliency_output_layer_has_no_bias_and_older_state_dicts_still_load():
    """A constant added to every token's saliency cancels in the per-sample min-max normalisation, so an
    output bias could never learn (its gradient was exactly 0 up to round-off)."""
    deft = DeFTModule(token_dim=16, semantic_dim=8, saliency_hidden_dim=8, retention_ratio=0.5)
    assert deft.saliency_scorer.mlp[4].bias is None
    state = deft.state_dict()
    state["saliency_scorer.mlp.4.bias"] = torch.tensor([3.0])  # what an older checkpoint holds
    fresh = DeFTModule(token_dim=16, semantic_dim=8, saliency_hidden_dim=8, retention_ratio=0.5)
    fresh.load_state_dict(state, strict=True)
    tokens = torch.randn(2, 16, 16)
    a = deft(tokens=tokens, modality="image", spatial_shape=(4, 4))
    b = fresh(tokens=tokens, modality="image", spatial_shape=(4, 4))
    assert torch.equal(a.kept_indices, b.kept_indices)


def test_readme_states_the_supported_range():
    readme = (ROOT / "README.md").read_text()
    assert f"`transformers{sv.supported_transformers_range()}`" in readme
    assert f"`peft>={sv.PEFT_MIN},<{sv.PEFT_BELOW}`" in readme
