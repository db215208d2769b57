"""MEDI as a TensorFlow Datasets dataset (ArrayRecord), built and read without TensorFlow.

    instructor-jax data build-tfds --input medi-data.json --data_dir DIR

(TFDS's `tfds build` command imports TensorFlow; from Python, `Medi(data_dir=DIR,
file_format="array_record").download_and_prepare(download_config=tfds.download.DownloadConfig(
manual_dir=DIR_WITH_medi-data.json))` builds the same.)

MEDI is not downloadable by TFDS (it ships on Google Drive), so the builder reads the user's local copy.
Records keep the file's order (`disable_shuffling`): the single-task batching of `instructor_jax.train.data`
then sees the file's task order, and a run from `tfds:medi` draws the same batches as one from the file.
The tasks of all records are kept run-length encoded in the dataset's metadata, so batching need not
read every record. Training reads it through `tfds.data_source` (`TrainConfig.train_file = 'tfds:medi'`,
`TrainConfig.tfds_data_dir = DIR`). Needs the `tfds` extra (tensorflow-datasets, which does not pull in
TensorFlow).
"""

from __future__ import annotations

import functools
import logging
import pathlib
from typing import Optional

import tensorflow_datasets as tfds

from instructor_jax.train.medi import Example, read_medi

log = logging.getLogger(__name__)

PREFIX = "tfds:"
SPLIT = "train"
_MANUAL_NAMES = ("medi-data.json", "medi-data.jsonl")


def _pair(pair) -> dict:
    return {"instruction": pair[0], "text": pair[1]}


class Medi(tfds.core.GeneratorBasedBuilder):
    """MEDI (Su et al., 2022): instruction-annotated (query, positive, hard negative) triples of 330 tasks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MEDI records in file order; task runs in the metadata."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the MEDI file (medi-data.json from the INSTRUCTOR release, or a .jsonl with one record a line) "
        "in the manual directory, or build with `instructor-jax data build-tfds --input FILE --data_dir DIR`.")

    def __init__(self, *, input_file: Optional[str] = None, skip_bad: bool = False,
                 examples: Optional[list] = None, **kwargs):
        self._input_file = input_file
        self._skip_bad = skip_bad
        self._examples = examples  # the records of input_file, read already (by `build`)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        pair = tfds.features.FeaturesDict({"instruction": tfds.features.Text(), "text": tfds.features.Text()})
        # DatasetInfo directly, not dataset_info_from_configs: that one looks for metadata files in a
        # package directory, which this single-module builder has not.
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({"query": pair, "pos": pair, "neg": tfds.features.Sequence(pair),
                                                 "task": tfds.features.Text()}),
            homepage="https://instructor-embedding.github.io/", disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
            citation="@inproceedings{su-etal-2023-one, title={One Embedder, Any Task: Instruction-Finetuned "
                     "Text Embeddings}, author={Su, Hongjin and others}, booktitle={Findings of ACL}, year={2023}}")

    def _input(self, dl_manager) -> pathlib.Path:
        if self._input_file is not None:
            return pathlib.Path(self._input_file)
        manual = pathlib.Path(dl_manager.manual_dir)
        for name in _MANUAL_NAMES:
            if (manual / name).is_file():
                return manual / name
        found = sorted([*manual.glob("*.json"), *manual.glob("*.jsonl")])
        if len(found) != 1:
            raise FileNotFoundError(f"{manual} should hold one MEDI file ({' or '.join(_MANUAL_NAMES)}); "
                                    f"it holds {[p.name for p in found]}")
        return found[0]

    def _split_generators(self, dl_manager):
        examples = self._examples
        if examples is None:
            input_file = self._input(dl_manager)
            examples = read_medi(input_file, skip_bad=self._skip_bad)
            if not examples:
                raise ValueError(f"{input_file} holds no MEDI records")
        runs: list[list] = []
        for example in examples:
            if runs and runs[-1][0] == example.task:
                runs[-1][1] += 1
            else:
                runs.append([example.task, 1])
        self.info.metadata["num_records"] = len(examples)
        self.info.metadata["task_runs"] = runs
        return {SPLIT: self._generate_examples(examples)}

    def _generate_examples(self, examples):
        for index, example in enumerate(examples):
            yield index, {"query": _pair(example.query), "pos": _pair(example.pos),
                          "neg": [_pair(n) for n in example.negs], "task": example.task}


def build(input_file, data_dir, skip_bad: bool = False, overwrite: bool = False) -> int:
    """Builds the `medi` dataset from a local MEDI file into `data_dir`; returns the number of records.
    A dataset built there before is refused (TFDS would keep it, and report its records as built from this
    file) unless `overwrite`, which replaces it. An input without records is refused before anything is
    written."""
    if not pathlib.Path(input_file).is_file():
        raise FileNotFoundError(f"--input {input_file} does not exist or is not a file")
    existing = pathlib.Path(data_dir, Medi.name, str(Medi.VERSION))
    if existing.exists() and not overwrite:
        raise FileExistsError(f"{existing} already holds a built medi dataset; pass --overwrite to replace it with "
                              f"one built from {input_file}, or give another --data_dir")
    examples = read_medi(input_file, skip_bad=skip_bad, skip_hint="pass --skip_bad_records (skip_bad=True in Python)")
    if not examples:
        raise ValueError(f"--input {input_file} holds no MEDI records (a JSON list of {{\"query\", \"pos\", "
                         "\"neg\", \"task\"} objects, or one such object a line); nothing was built")
    builder = Medi(input_file=str(input_file), skip_bad=skip_bad, examples=examples, data_dir=str(data_dir),
                   file_format="array_record")
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else None
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode) if mode else None)
    return builder.info.splits[SPLIT].num_examples


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TfdsMediSource:
    """Random-access Examples from a built MEDI TFDS dataset, read with `tfds.data_source` (a grain
    RandomAccessDataSource); usable wherever `instructor_jax.train.data` takes `examples`."""

    def __init__(self, name: str = "medi", data_dir: Optional[str] = None, split: str = SPLIT):
        self.name = name
        try:
            # download=False: a dataset that is not built is an error here, not a build attempt (which
            # would leave empty folders in the data dir, ~/tensorflow_datasets by default).
            self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # noqa: BLE001 - TFDS raises several kinds for a dataset that is not there
            raise FileNotFoundError(f"cannot open the TFDS dataset {name!r} (split {split!r}) in "
                                    f"{data_dir or 'the default TFDS data dir'}: {e}. Build it with "
                                    "`instructor-jax data build-tfds --input medi-data.json --data_dir DIR` and "
                                    "set TrainConfig.tfds_data_dir = 'DIR'") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        record = self._source[index]
        negs = record["neg"]
        return Example(query=(_text(record["query"]["instruction"]), _text(record["query"]["text"])),
                       pos=(_text(record["pos"]["instruction"]), _text(record["pos"]["text"])),
                       negs=tuple((_text(i), _text(t)) for i, t in zip(negs["instruction"], negs["text"])),
                       task=_text(record["task"]))

    @functools.cached_property
    def tasks(self) -> list[str]:
        runs = (self._source.dataset_info.metadata or {}).get("task_runs")
        if runs is None:
            log.info("%s has no task_runs metadata: reading every record for its task", self.name)
            return [_text(self._source[i]["task"]) for i in range(len(self))]
        tasks = [task for task, count in runs for _ in range(count)]
        if len(tasks) != len(self):
            raise ValueError(f"the {self.name} dataset's metadata lists {len(tasks)} records but it holds "
                             f"{len(self)}; rebuild it with `instructor-jax data build-tfds`")
        return tasks


def parse_name(train_file: str) -> Optional[str]:
    """'medi' for 'tfds:medi' (any TFDS name, with /config or :version); None for a file path."""
    return train_file[len(PREFIX):] if str(train_file).startswith(PREFIX) else None
