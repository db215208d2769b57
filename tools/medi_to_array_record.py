"""Converts a MEDI JSON or JSONL file to ArrayRecord, for random access without parsing the whole file.

    python tools/medi_to_array_record.py medi-data.json medi.array_record [--skip_bad]

Writes OUT (one JSON-encoded record per example, in file order, every record checked as `read_medi`
checks it) and OUT.tasks.json (the task of every record, run-length encoded, so that batching does not
read every record). Read it back with `instructor_jax.train.medi.MediArrayRecordSource(OUT)`, which every
function of `instructor_jax.train.data` takes in place of a list of examples. Needs the `array_record`
package; no TensorFlow. The full MEDI (~1.4M examples) takes a few minutes and some GB of memory once.
"""

import argparse
import logging

from instructor_jax.train.medi import read_medi, write_array_record


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="MEDI file: a JSON list (.json) or JSON Lines (.jsonl)")
    parser.add_argument("out", help="the ArrayRecord file to write, e.g. medi.array_record")
    parser.add_argument("--skip_bad", action="store_true", help="skip malformed records instead of failing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    examples = read_medi(args.source, skip_bad=args.skip_bad)
    write_array_record(examples, args.out)
    print(f"wrote {args.out}: {len(examples)} records, {len({e.task for e in examples})} tasks")


if __name__ == "__main__":
    main()
