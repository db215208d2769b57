"""`instructor-jax data`: preparing training data (`build-tfds`, and `mine`: MEDI from one's own pairs)."""

from __future__ import annotations


def add_parser(commands) -> None:
    data = commands.add_parser("data", help="prepare training data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    build_tfds = data_commands.add_parser(
        "build-tfds", help="build MEDI as a TFDS dataset (ArrayRecord) from a local MEDI file",
        description="Builds the `medi` TensorFlow Datasets dataset (ArrayRecord files, record order kept) from "
                    "INPUT into DATA_DIR/medi/1.0.0, without TensorFlow (needs the tfds extra). Train from it "
                    "with --gin_bindings \"TrainConfig.train_file = 'tfds:medi'\" --gin_bindings "
                    "\"TrainConfig.tfds_data_dir = 'DATA_DIR'\".")
    build_tfds.add_argument("--input", required=True, help="the MEDI file: a JSON list (.json) or JSON Lines")
    build_tfds.add_argument("--data_dir", required=True, help="the TFDS data directory to build into")
    build_tfds.add_argument("--skip_bad_records", action="store_true", help="skip malformed records (counted)")
    build_tfds.add_argument("--overwrite", action="store_true",
                            help="replace a medi dataset built in DATA_DIR before (otherwise refused)")
    build_tfds.set_defaults(run=run)
    from instructor_jax.mining import command as mining

    mine = data_commands.add_parser("mine", help="MEDI training data from (query, positive) pairs: hard "
                                                 "negatives, or the INSTRUCTOR paper's recipe")
    mining.add_arguments(mine)
    mine.set_defaults(run=run_mine)


def run(args) -> None:
    import pathlib

    # Before TFDS (the tfds extra) is imported: a wrong --input is said first.
    if not pathlib.Path(args.input).is_file():
        raise FileNotFoundError(f"--input {args.input} does not exist or is not a file")
    from instructor_jax.train import tfds_medi

    count = tfds_medi.build(args.input, args.data_dir, skip_bad=args.skip_bad_records, overwrite=args.overwrite)
    print(f"built the medi TFDS dataset in {args.data_dir}: {count} records; train with "
          f"TrainConfig.train_file = 'tfds:medi' and TrainConfig.tfds_data_dir = '{args.data_dir}'")



def run_mine(args) -> None:
    from instructor_jax.mining import command as mining

    code = mining.run(args)
    if code:
        raise SystemExit(code)
