"""`instructor-jax plot`: PNG files of the expected size that are not blank."""

import json

import numpy as np
import pytest

from instructor_jax import plots

pytest.importorskip("matplotlib", reason="the plot extra (make test installs it)")


def read_png(path) -> np.ndarray:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return imread(str(path))


def assert_picture(path, size):
    image = read_png(path)
    assert image.shape[:2] == (size[1] * plots.DPI, size[0] * plots.DPI)
    assert image[..., :3].std() > 0.01  # something is drawn on the white


def test_training_curves(tmp_path):
    rows = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-3 * min(1, s / 5)} for s in range(1, 21)]
    rows += [{"step": s, "held_out_accuracy": 0.3 + s / 40, "eval/TinyActionSTS": 0.2 + s / 30} for s in (0, 10, 20)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_picture(plots.training_curves(metrics, tmp_path / "curves.png"), plots.CURVES_SIZE)


@pytest.mark.fast
def test_no_empty_panel_and_legends_in_label_order():
    only_training = [{"step": s, "loss": 1.0 / s, "learning_rate": 0.1} for s in range(1, 5)]
    assert [title for title, _ in plots.curve_panels(only_training)] == ["loss", "learning rate"]
    with_eval = only_training + [{"step": 4, "held_out_accuracy": 0.5, "eval/A": 0.1}]
    assert len(plots.curve_panels(with_eval)) == 4
    from instructor_jax.evaluation.instructions import BUNDLED_TASKS

    _, labels, _, names = plots.labelled_set(BUNDLED_TASKS / "TinySubjectClustering")
    entries = plots.legend_entries(labels, names)
    assert [label for label, _ in entries] == list(range(8))  # 0..7, not the order they first appear in
    assert entries[2] == (2, "the patient")  # test.jsonl: "The patient analyzes the ocean currents." is label 2


def test_embedding_map(tmp_path, relu_instructor):
    from instructor_jax.evaluation.instructions import BUNDLED_TASKS

    texts, labels, instruction, names = plots.labelled_set(BUNDLED_TASKS / "TinySubjectClustering")
    assert instruction and len(set(labels)) == 8
    path = plots.embedding_map(relu_instructor, texts[:40], labels[:40], instruction, tmp_path / "map.png",
                               label_names=names)
    assert_picture(path, plots.MAP_SIZE)


def test_cli_plot(tmp_path, relu_instructor, capsys):
    from instructor_jax.cli import main

    relu_instructor.save_pretrained(tmp_path / "model")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "learning_rate": 0.1}) + "\n")
    main(["plot", "--metrics", str(tmp_path / "metrics.jsonl"), "--model", str(tmp_path / "model"),
          "--output", str(tmp_path / "pictures")])
    assert_picture(tmp_path / "pictures" / "training_curves.png", plots.CURVES_SIZE)
    assert_picture(tmp_path / "pictures" / "embedding_map.png", plots.MAP_SIZE)
    assert "wrote" in capsys.readouterr().out


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("bad, message", [("{oops", "line 2: not JSON"), ("[1, 2]", "line 2: not a metrics record"),
                                          ('{"loss": 1.0}', "line 2: not a metrics record")])
def test_a_bad_metrics_line_is_named(tmp_path, capsys, bad, message):
    from instructor_jax.cli import main

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n" + bad + "\n")
    with pytest.raises(SystemExit) as exit_:
        main(["plot", "--metrics", str(metrics), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"metrics.jsonl, {message}" in err, err
