"""The embedded default job (the README's first command) runs green."""

from instructor_jax.cli import main


def test_demo_shows_parity(tmp_path, capsys):
    main(["demo", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bit-identical: True" in out and out.rstrip().endswith("demo: OK")
