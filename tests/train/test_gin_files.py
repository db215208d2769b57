"""`--gin_file` takes a path or a bundled config's name, from any directory."""

import pathlib

import pytest

from instructor_jax.train.gin_files import BUNDLED, bundled_names, resolve_gin_file

REPO = pathlib.Path(__file__).parents[2]


@pytest.mark.fast
def test_the_bundled_configs_are_the_repository_configs():
    assert bundled_names() == sorted(p.stem for p in (REPO / "configs").glob("*.gin"))
    assert (BUNDLED / "tiny.gin").read_text() == (REPO / "configs" / "tiny.gin").read_text()


@pytest.mark.fast
@pytest.mark.parametrize("name", ["tiny", "tiny.gin", "configs/tiny.gin"])
def test_a_bundled_name_works_from_any_directory(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert pathlib.Path(resolve_gin_file(name)).read_text() == (REPO / "configs" / "tiny.gin").read_text()


@pytest.mark.fast
def test_a_path_that_exists_wins_and_an_unknown_name_lists_the_bundled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.gin").write_text("TrainConfig.total_steps = 3\n")
    assert resolve_gin_file("tiny.gin") == "tiny.gin"
    with pytest.raises(FileNotFoundError, match="instructor_base, instructor_large, instructor_xl, tiny"):
        resolve_gin_file("tiniest")
    with pytest.raises(FileNotFoundError):
        resolve_gin_file("elsewhere/tiny.gin")  # a directory that is not there is a typo, not the bundled one
