"""`instructor-jax demo`: the embedded default job."""

from __future__ import annotations


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="build a tiny model, convert it both ways, show PyTorch parity")
    demo.add_argument("--workdir", help="the folder for the demo's run, model, exports and pictures, kept "
                                        "(default: runs/demo; a rerun replaces a folder an earlier demo wrote, and "
                                        "refuses any other)")
    demo.set_defaults(run=run)


def run(args) -> None:
    from instructor_jax.demo import run_demo

    if not run_demo(args.workdir):
        raise SystemExit(1)

