"""The inspection command: answers, kept tokens, timings and the overlay PNG for any patch grid."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
from PIL import Image

from modeling_deft_llava.commands.visualize import main, overlay_kept_tokens


def test_overlay_dims_pruned_patches_for_any_grid():
    image = Image.fromarray(np.full((30, 50, 3), 200, dtype=np.uint8))
    out = np.asarray(overlay_kept_tokens(image, [0, 7], (3, 5), scale=2))
    assert out.shape == (60, 100, 3)
    assert out[50, 90].mean() < 100  # pruned patch 14 (row 2, col 4) is dimmed
    assert out[30, 50].mean() > 150  # kept patch 7 (row 1, col 2) is not
    assert out[10, 10].mean() > 150  # inside kept patch 0
    with pytest.raises(ValueError, match="outside the 3x5 patch grid"):
        overlay_kept_tokens(image, [15], (3, 5))


def test_command_on_a_deft_folder(tmp_path, capsys):
    tiny.model(use_deft=True, deft_retention_ratio=0.25).save_pretrained(tmp_path / "m")
    tiny.processor(use_deft=True, deft_retention_ratio=0.25).save_pretrained(tmp_path / "m")
    paths = []
    for i, image in enumerate(tiny.images(2)):
        paths.append(str(tmp_path / f"img{i}.png"))
        image.save(paths[-1])
    main(
        [
            str(tmp_path / "m"),
            *paths,
            "--question",
            "what is in the picture ?",
            "--out",
            str(tmp_path / "o.png"),
            "--repeats",
            "1",
            "--max-new-tokens",
            "3",
        ]
    )
    printed = capsys.readouterr().out
    assert printed.count("kept 4/16 visual tokens") == 2
    assert printed.count("time saved") + printed.count("no measurable difference") == 2
    assert Image.open(tmp_path / "o.png").size[0] == 2 * 32 * 4


def test_command_errors(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "x.png", "--question", "q"])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_user_errors_are_one_error_line(tmp_path, capsys):
    tiny.model(use_deft=True, deft_retention_ratio=0.25).save_pretrained(tmp_path / "m")
    tiny.processor(use_deft=True, deft_retention_ratio=0.25).save_pretrained(tmp_path / "m")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    capsys.readouterr()
    cases = [
        ([str(tmp_path / "nowhere"), "x.png"], "does not exist"),
        ([str(tmp_path), "x.png"], "no config.json"),
        ([str(tmp_path / "m"), str(tmp_path / "x.png")], "not found"),
        ([str(tmp_path / "m"), str(tmp_path / "broken.png")], "not a readable image"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as caught:
            main([*argv, "--question", "q", "--out", str(tmp_path / "o.png")])
        assert caught.value.code == 2
        assert words in _one_error_line(capsys)


def test_an_unreadable_folder_is_not_reported_as_missing_config(tmp_path, capsys, monkeypatch):
    """The tests may run as root, for whom every folder is readable: the permission answer is simulated."""
    import os

    from modeling_deft_llava.training import folders

    tiny.model(use_deft=True, deft_retention_ratio=0.25).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    monkeypatch.setattr(
        folders.os, "access", lambda path, mode: not str(path).startswith(str(tmp_path / "m"))
    )
    with pytest.raises(ValueError, match="cannot be read by this user") as caught:
        folders.check_readable_folder(tmp_path / "m")
    assert "no config.json" not in str(caught.value)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "m"), "x.png", "--question", "q"])
    assert "cannot be read by this user" in _one_error_line(capsys)
    from modeling_deft_llava.training.warm_start import check_model_folder

    from modeling_deft_llava.commands.convert import convert

    for fn in (
        lambda: convert(str(tmp_path / "m"), str(tmp_path / "out")),
        lambda: check_model_folder(str(tmp_path / "m")),
    ):
        with pytest.raises(ValueError, match="cannot be read by this user"):
            fn()
    assert os.path.isdir(tmp_path / "m")


def test_a_saving_is_claimed_only_when_the_runs_do_not_overlap():
    """A few tiny prefills on a busy machine printed "-24% time saved" for a model that saves time."""
    from modeling_deft_llava.commands.visualize import saving_text

    assert saving_text([0.8, 0.81, 0.79], [1.0, 1.02, 0.99]) == "(+20% time saved)"
    assert saving_text([1.2, 1.25], [1.0, 1.01]).startswith("(-")
    assert "no measurable difference" in saving_text([0.8, 1.3, 0.9], [1.0, 1.02, 0.99])


def test_words_outside_a_word_level_vocabulary_are_named(caplog):
    from modeling_deft_llava.commands.visualize import words_read_as_unknown

    tokenizer = tiny.tokenizer()
    assert words_read_as_unknown(tokenizer, "what is in the zebra ?") == ["zebra"]
    assert words_read_as_unknown(tokenizer, "what is in the picture ?") == []
