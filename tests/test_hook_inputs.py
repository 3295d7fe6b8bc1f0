"""A method's hooks get what they use in their records (the batch's K, the layers and embeddings), never the whole
model, and no method recomputes K from `deft_retention_ratio`: the model applies the one rounding rule."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

from modeling_deft_llava.compressors.compression_method import CompressionMethod, PromptBatch
from modeling_deft_llava.compressors.compression_registry import METHODS, build_compressor
from modeling_deft_llava.modeling_outputs_deft_llava import DeftVisualFeaturesOutput

COMPRESSORS = Path(inspect.getfile(CompressionMethod)).parent
HOOKS = (
    "encode_images",
    "compress_vision_features",
    "compress_features",
    "compress_with_prompt",
    "run_language_model",
    "reconsider",
    "compress_text",
)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_no_hook_takes_the_model(name):
    for hook in HOOKS:
        parameters = inspect.signature(getattr(METHODS[name], hook)).parameters
        assert "model" not in parameters, f"{name}.{hook} takes the model"


def test_no_method_recomputes_k():
    for path in sorted(COMPRESSORS.glob("method_*.py")):
        tree = ast.parse(path.read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        imported = {
            a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
        }
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert "num_kept_tokens" not in names | imported, path.name
        assert "deft_retention_ratio" not in attributes, path.name


@pytest.mark.parametrize("name", ["cdpruner", "recoverable"])
def test_a_prompt_batch_without_k_is_refused_by_name(name):
    method = build_compressor(name, 8)
    features = DeftVisualFeaturesOutput(
        pooler_output=[torch.randn(4, 8)],
        cls_embeddings=torch.randn(1, 8),
        cls_attention=torch.rand(1, 4),
        projector_inputs=[torch.randn(4, 6)],  # Recoverable's released order merges these, then projects
    )
    placeholders = torch.tensor([[False, True, True, True, True, False]])
    prompt = PromptBatch(
        torch.randn(1, 6, 8), placeholders, ~placeholders, prompt_length=6, projector=torch.nn.Linear(6, 8)
    )
    with pytest.raises(ValueError, match=f"{name} keeps K tokens per item and needs PromptBatch.num_kept"):
        method.compress_with_prompt(features, prompt)
    prompt.num_kept = 2
    out = method.compress_with_prompt(features, prompt)
    assert int(out.rows_used[0].sum()) == 2
