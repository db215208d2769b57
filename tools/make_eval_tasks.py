"""Writes the small evaluation set that ships in instructor_jax/assets/eval_tasks.

    python tools/make_eval_tasks.py [--out instructor_jax/assets/eval_tasks] [--seed 0]

One local task per mteb task type (STS, retrieval, reranking, classification, clustering, pair
classification, summarization), in the layout `instructor_jax.evaluation.tasks` documents: a `task.json`
(name, type, description, instruction) and JSONL files. Also writes `paraphrases.json`: five instructions
per task, for `instructor-jax eval --paraphrases`. Deterministic for a seed; the output is committed, so
only rerun it to change the set.

Why it looks like this: it must show, on the demo's tiny model, what the paper claims, that the right
instruction beats none. Every text is a "<subject> <verb> <object>." sentence from the word lists the
bundled tokenizer and MEDI sample use (tools/make_tokenizer.py, tools/make_medi_sample.py), and never one
of the sample's training texts. In every task the texts that belong together share one slot (the subject,
the action or the object), while the distractors share another slot just as often: a bag of words, or a
model given no instruction, cannot tell them apart; a model that follows "... with the same subject: "
can. The instructions are those the sample trains with.
"""

import argparse
import json
import pathlib
import random
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from make_medi_sample import SENTENCE_INSTRUCTION, sentence  # noqa: E402
from make_tokenizer import OBJECTS, SUBJECTS, VERBS  # noqa: E402

SLOTS = {"subject": 0, "action": 1, "object": 2}
WORDS = (SUBJECTS, VERBS, OBJECTS)
ROOT = pathlib.Path(__file__).parents[1]


def instruction(slot: str) -> str:
    return SENTENCE_INSTRUCTION.format(slot)


# Five wordings of each instruction, for the robustness analysis (the paper used five paraphrases).
PARAPHRASES = [
    "Represent the news sentence for retrieving a sentence with the same {}: ",
    "Represent the sentence for retrieving a sentence with the same {}: ",
    "Represent the Wikipedia sentence for retrieving a sentence with the same {}: ",
    "Represent the news statement for retrieving a statement with the same {}: ",
    "Represent this sentence for finding a sentence with the same {}: ",
]


class Sentences:
    """Random sentences, never one of the training sample's texts, each used once."""

    def __init__(self, rng: random.Random, forbidden: set[str]):
        self.rng, self.used = rng, set(forbidden)

    def make(self, fixed: dict[int, str] = None, avoid: dict[int, set] = None) -> str:
        fixed, avoid = fixed or {}, avoid or {}
        for _ in range(10_000):
            words = [fixed.get(i) or self.rng.choice([w for w in WORDS[i] if w not in avoid.get(i, ())])
                     for i in range(3)]
            text = sentence(words)
            if text not in self.used:
                self.used.add(text)
                return text
        raise RuntimeError("ran out of sentences")

    def words(self) -> list[str]:
        """The words of a new sentence, which is marked used (callers write it with `make(fixed=all)`)."""
        while True:
            words = [self.rng.choice(words) for words in WORDS]
            if sentence(words) not in self.used:
                return words

    def base(self) -> tuple[list[str], str]:
        """(words, text) of a new sentence."""
        words = self.words()
        return words, self.make(dict(enumerate(words)))


def share(s: Sentences, base: list[str], slot: int) -> str:
    """A sentence sharing exactly `slot` with `base`."""
    return s.make({slot: base[slot]}, {i: {base[i]} for i in range(3) if i != slot})


def write_task(out: pathlib.Path, name: str, kind: str, description: str, files: dict, **extra) -> None:
    directory = out / name
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("*.jsonl"):
        old.unlink()
    (directory / "task.json").write_text(json.dumps(
        {"name": name, "type": kind, "description": description, **extra}, indent=1) + "\n")
    for filename, rows in files.items():
        with (directory / filename).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "instructor_jax/assets/eval_tasks"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    train = ROOT / "instructor_jax/assets/medi_sample/train.jsonl"
    forbidden = {json.loads(line)[k][1] for line in train.open() for k in ("query", "pos", "neg")}
    s = Sentences(rng, forbidden)
    out = pathlib.Path(args.out)
    paraphrases = {}

    # Retrieval: each query's one relevant document shares its subject; two distractors share its action
    # or its object.
    queries, corpus, qrels = [], [], []
    for q in range(48):
        base, text = s.base()
        queries.append({"id": f"q{q}", "text": text})
        for kind, slot in (("pos", 0), ("verb", 1), ("obj", 2)):
            corpus.append({"id": f"d{q}-{kind}", "title": "", "text": share(s, base, slot)})
        qrels.append({"query_id": f"q{q}", "doc_id": f"d{q}-pos", "score": 1})
    write_task(out, "TinySubjectRetrieval", "Retrieval",
               "Find the sentence with the same subject among sentences sharing its action or object.",
               {"queries.jsonl": queries, "corpus.jsonl": corpus, "qrels.jsonl": qrels},
               instruction={"query": instruction("subject"), "corpus": instruction("subject")})
    paraphrases["TinySubjectRetrieval"] = [p.format("subject") for p in PARAPHRASES]

    # Reranking: 6 candidates per query, 2 relevant (same action), 2 with its subject, 2 with its object.
    queries, corpus, qrels, top = [], [], [], []
    for q in range(32):
        base, text = s.base()
        queries.append({"id": f"q{q}", "text": text})
        ids = []
        for kind, slot in (("pos", 1), ("subj", 0), ("obj", 2)):
            for k in range(2):
                corpus.append({"id": f"d{q}-{kind}{k}", "text": share(s, base, slot)})
                ids.append(f"d{q}-{kind}{k}")
                if kind == "pos":
                    qrels.append({"query_id": f"q{q}", "doc_id": f"d{q}-{kind}{k}", "score": 1})
        rng.shuffle(ids)
        top.append({"query_id": f"q{q}", "doc_ids": ids})
    write_task(out, "TinyActionReranking", "Reranking",
               "Rank the sentences with the same action above those sharing its subject or object.",
               {"queries.jsonl": queries, "corpus.jsonl": corpus, "qrels.jsonl": qrels, "top_ranked.jsonl": top},
               instruction={"query": instruction("action"), "corpus": instruction("action")})
    paraphrases["TinyActionReranking"] = [p.format("action") for p in PARAPHRASES]

    # STS: 5 = same action and object, 3 = same action only, 0 = same subject or same object only.
    rows = []
    for _ in range(40):
        base, first = s.base()
        rows.append({"sentence1": first, "sentence2": s.make({1: base[1], 2: base[2]}, {0: {base[0]}}), "score": 5})
        rows.append({"sentence1": first, "sentence2": share(s, base, 1), "score": 3})
        rows.append({"sentence1": first, "sentence2": share(s, base, rng.choice((0, 2))), "score": 0})
    write_task(out, "TinyActionSTS", "STS", "How similar the actions of two sentences are (0-5).",
               {"test.jsonl": rows}, instruction=instruction("action"), min_score=0, max_score=5)
    paraphrases["TinyActionSTS"] = [p.format("action") for p in PARAPHRASES]

    # Pair classification: same object (1) or only the same subject or action (0).
    rows = []
    for _ in range(60):
        base, first = s.base()
        rows.append({"sentence1": first, "sentence2": share(s, base, 2), "label": 1})
        rows.append({"sentence1": first, "sentence2": share(s, base, rng.choice((0, 1))), "label": 0})
    write_task(out, "TinyObjectPairClassification", "PairClassification",
               "Whether two sentences have the same object.", {"test.jsonl": rows},
               instruction=instruction("object"))
    paraphrases["TinyObjectPairClassification"] = [p.format("object") for p in PARAPHRASES]

    # Classification: which of 8 objects a sentence has (8 training sentences per label, as mteb samples).
    labels = rng.sample(OBJECTS, 8)
    split = {"train.jsonl": 8, "test.jsonl": 16}
    files = {name: [{"text": s.make({2: obj}), "label": i} for i, obj in enumerate(labels) for _ in range(n)]
             for name, n in split.items()}
    for rows in files.values():
        rng.shuffle(rows)
    write_task(out, "TinyObjectClassification", "Classification", "Which object a sentence has (8 classes).",
               files, instruction=instruction("object"), label_names=labels)
    paraphrases["TinyObjectClassification"] = [p.format("object") for p in PARAPHRASES]

    # Clustering: sentences of 8 subjects, 12 each.
    subjects = rng.sample(SUBJECTS, 8)
    rows = [{"text": s.make({0: subj}), "label": i} for i, subj in enumerate(subjects) for _ in range(12)]
    rng.shuffle(rows)
    write_task(out, "TinySubjectClustering", "Clustering", "Group sentences by their subject (8 clusters).",
               {"test.jsonl": rows}, instruction=instruction("subject"), label_names=subjects)
    paraphrases["TinySubjectClustering"] = [p.format("subject") for p in PARAPHRASES]

    # Summarization: a machine summary is as relevant as it keeps the text's subject (3) and action (1).
    rows = []
    for _ in range(24):
        base, text = s.base()
        summaries, relevance = [], []
        for keep in ((0, 1), (0,), (1,), (2,)):
            fixed = {i: base[i] for i in keep}
            summaries.append(s.make(fixed, {i: {base[i]} for i in range(3) if i not in keep}))
            relevance.append(3 * (0 in keep) + (1 in keep))
        # The human summary is the text itself: a sentence has no shorter form here.
        rows.append({"text": text, "human_summaries": [text],
                     "machine_summaries": summaries, "relevance": relevance})
    write_task(out, "TinySubjectSummarization", "Summarization",
               "Score machine summaries that keep the subject above those that keep other words.",
               {"test.jsonl": rows}, instruction=instruction("subject"), min_score=0, max_score=4)
    paraphrases["TinySubjectSummarization"] = [p.format("subject") for p in PARAPHRASES]

    (out / "paraphrases.json").write_text(json.dumps(
        {"_source": "tools/make_eval_tasks.py: five wordings of each bundled task's instruction", **paraphrases},
        indent=1) + "\n")
    print(f"wrote {out}: {len(paraphrases)} tasks and their paraphrases")


if __name__ == "__main__":
    main()
