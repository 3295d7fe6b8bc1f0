"""DeFT `hybrid` on a model loaded with weights offloaded to disk equals the in-memory model (issue 25).

`hybrid` reads each visual token through the vocabulary embedding. Before: it read
`get_input_embeddings().weight` outside the module's forward, where an offloaded weight is a placeholder, and
got a crash or, in some runs, silently different logits."""

from __future__ import annotations

import tiny
import torch

from modeling_deft_llava import DeftLlavaForConditionalGeneration

# the language model on disk (embeddings included), the rest in memory
DEVICE_MAP = {
    "model.vision_tower": "cpu",
    "model.multi_modal_projector": "cpu",
    "model.deft": "cpu",
    "model.language_model": "disk",
    "lm_head": "cpu",
}


def vocabulary_logits(model, inputs) -> torch.Tensor:
    """The `logits` the DeFT module received in a forward (hybrid's reading of every visual token)."""
    seen = []
    handle = model.model.deft.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["logits"].clone()), with_kwargs=True
    )
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        handle.remove()
    return seen[0], out


def test_hybrid_under_disk_offload_equals_the_in_memory_model(tmp_path):
    settings = dict(use_deft=True, deft_retention_ratio=0.25, deft_inference_mode="hybrid")
    model, processor = tiny.model(**settings), tiny.processor(**settings)
    inputs = processor(images=tiny.images(2), text=[tiny.prompt(1)] * 2, return_tensors="pt")
    model.save_pretrained(tmp_path / "model")
    offloaded = DeftLlavaForConditionalGeneration.from_pretrained(
        tmp_path / "model", device_map=DEVICE_MAP, offload_folder=tmp_path / "offload"
    ).eval()
    assert offloaded.get_input_embeddings().weight.device.type == "meta"  # really offloaded
    expected_logits, expected = vocabulary_logits(model, inputs)
    logits, out = vocabulary_logits(offloaded, inputs)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=0)
    assert torch.equal(out.num_reconstructed, expected.num_reconstructed)
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-6)
    # the placeholder is back after the forward: the weights stay offloaded
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    gen = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[4, 5])
    assert torch.equal(offloaded.generate(**inputs, **gen), model.generate(**inputs, **gen))
