"""Builds the small T5 tokenizer that ships in instructor_jax/assets/tiny_tokenizer.

    python tools/make_tokenizer.py [--out instructor_jax/assets/tiny_tokenizer] [--vocab_size 256]

No hub is reachable from the machines this project is tested on, so tests, the demo and the training
sample use a SentencePiece unigram model trained here, on a synthetic corpus of INSTRUCTOR-style
instructions and sentences, with T5's conventions (pad 0, </s> 1, <unk> 2, no BOS). It is converted with
transformers' own T5 converter, so the files are laid out exactly like a real T5 checkpoint's.
Takes a few seconds; the output is committed, so only rerun it to change the tokenizer.
"""

import argparse
import itertools
import pathlib
import random
import tempfile

DOMAINS = ["Wikipedia", "scientific", "medical", "financial", "legal", "news", "biomedical", "Amazon",
           "Twitter", "StackExchange", "Reddit", "academic", "sports", "cooking", "travel", "music"]
TYPES = ["question", "document", "sentence", "title", "review", "post", "abstract", "comment", "answer",
         "paragraph", "tweet", "statement", "summary", "passage"]
TASKS = ["retrieving supporting documents", "retrieval", "classification", "clustering",
         "classifying the sentiment", "finding a duplicate question", "retrieving relevant answers",
         "semantic similarity", "classifying the topic", "reranking", "summarization",
         # The objectives of the bundled training sample (tools/make_medi_sample.py).
         "retrieving a sentence with the same subject", "retrieving a sentence with the same object",
         "retrieving a sentence with the same action"]
SUBJECTS = ["the river", "a yam plant", "the market", "my neighbour", "the committee", "a small dog",
            "the new phone", "this recipe", "the orchestra", "the court", "the patient", "our team",
            "the satellite", "a vaccine", "the old bridge", "the central bank", "the library", "the storm",
            "the teacher", "a young farmer", "the museum", "the airline", "the hospital", "a local bakery",
            "the government", "the robot", "the volcano", "my grandmother", "the startup", "the school board",
            "a tired student", "the factory"]
VERBS = ["stores", "moves", "describes", "explains", "changes", "protects", "improves", "predicts",
         "rejects", "measures", "follows", "builds", "reduces", "supports", "discovers", "sells",
         "ignores", "repairs", "collects", "delays", "celebrates", "questions", "funds", "analyzes", "hides",
         "shares", "tests", "records", "prefers", "replaces", "studies", "cleans"]
OBJECTS = ["food in its roots", "the interest rate", "a quiet melody", "the final score", "heavy rain",
           "the evidence", "new customers", "cell growth", "the highway traffic", "ancient manuscripts",
           "the battery life", "fresh vegetables", "the election results", "a rare disease",
           "the ocean currents", "tax rules", "the goal keeper", "solar energy", "the morning train",
           "faded photographs", "the water supply", "a broken window", "the lunch menu", "wild flowers",
           "the city budget", "a secret map", "the winter coats", "the mountain trail", "warm bread",
           "the copper wires", "a long letter", "the harvest festival"]
EXTRA = ["Where is the food stored in a yam plant?", "Capitalism has been dominant in the Western world.",
         "The stock fell 3.5% on Tuesday after the report.", "I loved this phone, the battery lasts two days!",
         "Café, naïve, résumé, Zürich, São Paulo, Ελλάδα, 東京, Москва — unicode text.",
         "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2023 3.14", "How do I reset my password?",
         "What causes tides in the ocean?", "The committee approved the budget for next year."]


def corpus(num_sentences: int, seed: int = 0):
    rng = random.Random(seed)
    for d, t, k in itertools.product(DOMAINS, TYPES, TASKS):
        yield f"Represent the {d} {t} for {k}:"
    for _ in range(num_sentences):
        yield f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
    for _ in range(num_sentences // 10):  # the questions of the sample's question-answer task
        yield f"Who {rng.choice(VERBS)} {rng.choice(OBJECTS)}?"
    for _ in range(50):
        yield from EXTRA


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parents[1] / "instructor_jax/assets/tiny_tokenizer"))
    parser.add_argument("--vocab_size", type=int, default=256)
    args = parser.parse_args()

    import sentencepiece as spm
    from transformers import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        text = pathlib.Path(tmp, "corpus.txt")
        text.write_text("\n".join(corpus(20000)) + "\n", encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=f"{tmp}/spiece", vocab_size=args.vocab_size, model_type="unigram",
            pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
            normalization_rule_name="nmt_nfkc", hard_vocab_limit=False, minloglevel=2)
        # from_pretrained, not T5Tokenizer(vocab_file=...): the latter silently maps everything to <unk>.
        tokenizer = T5Tokenizer.from_pretrained(tmp)
        tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}: {len(tokenizer)} tokens;", tokenizer.tokenize(EXTRA[0]))


if __name__ == "__main__":
    main()
