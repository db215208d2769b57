"""Which pooling rule a sentence-transformers checkpoint needs, decided from evidence, never from a folder name.

The hkunlp INSTRUCTOR repositories are plain sentence-transformers layouts (Transformer, Pooling, Dense,
Normalize) whose pooling config has no `include_prompt` key: their files alone cannot tell them from GTR,
which pools the instruction too. A local copy's folder name is whatever the user or the hub cache chose
(`snapshots/<commit hash>`), so it says nothing. The decision, in this order:

1. `pooling_rule=` given by the caller (`--pooling_rule` on the command line, `TrainConfig.pooling_rule`).
2. What the files state: our own `instructor_jax.json` beside them (written by every export; it alone can
   say "instructor" rather than "sentence-transformers", the two differ for one-piece instructions), or an
   explicit `include_prompt` in the pooling config (true -> "none", false -> "sentence-transformers").
   The two disagreeing is an error, not a silent win.
3. The model's identity, where it can be known: the hub id the caller gave; a hub id recoverable from the
   path (the Hugging Face cache lays a download out as `models--ORG--NAME/snapshots/HASH/`; every path
   component is looked at, of the path as given and as resolved); a model card (README.md: its
   `model-index` name, `base_model`, or a `# ORG/NAME` title); config.json's `_name_or_path` when it is a
   hub id. INSTRUCTOR -> "instructor"; GTR and sentence-T5 -> "none". A card's `base_model` counts only
   for INSTRUCTOR: a fine-tune of INSTRUCTOR keeps its pooling, while INSTRUCTOR itself descends from GTR.
4. Otherwise the meaning of what the user called: InstructorEmbedding's `INSTRUCTOR(path)` applies the
   instruction-excluding pooling to any directory, and so do `Instructor.from_pretrained` and the
   `instructor-jax` commands. For a GTR model used without instructions both rules give the same numbers.

One log line (INFO, on the `instructor_jax.checkpoints.pooling_evidence` logger, which the CLI always shows) says
which rule was chosen, why, and how to override it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Iterator, Optional

from instructor_jax.checkpoints.hub import HUB_ID
from instructor_jax.model.tokenization import POOLING_RULES

log = logging.getLogger(__name__)

RULE_MEANINGS = {
    "instructor": "mean over the text tokens, instruction left out (InstructorEmbedding 1.0.1)",
    "sentence-transformers": "mean over the text tokens, instruction left out (sentence-transformers prompt=)",
    "none": "mean over all tokens, instruction included (GTR, sentence-T5)",
}
OVERRIDE_ADVICE = ("override with pooling_rule= (Python) or --pooling_rule (instructor-jax convert / encode), "
                   f"one of {', '.join(POOLING_RULES)}")

# Model families by hub id (compared lowercased: the hub treats ids case-insensitively).
FAMILY_RULES = (
    (re.compile(r"^hkunlp/instructor-[\w.-]+$"), "INSTRUCTOR", "instructor"),
    (re.compile(r"^sentence-transformers/gtr-t5-[\w.-]+$"), "GTR", "none"),
    (re.compile(r"^sentence-transformers/sentence-t5-[\w.-]+$"), "sentence-T5", "none"),
)
HUB_CACHE_FOLDER = re.compile(r"^models--(?P<org>[^/]+?)--(?P<name>[^/]+)$")
CARD_TITLE = re.compile(r"^#\s+(?P<id>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)\s*$", re.MULTILINE)


@dataclasses.dataclass(frozen=True)
class PoolingDecision:
    rule: str
    reason: str

    def describe(self, source) -> str:
        return (f"pooling rule {self.rule!r} ({RULE_MEANINGS[self.rule]}) for {source}: {self.reason}; "
                f"{OVERRIDE_ADVICE}")


def family_of(hub_id: str) -> Optional[tuple[str, str]]:
    """(family, rule) for a hub id of a known model family, else None."""
    for pattern, family, rule in FAMILY_RULES:
        if pattern.match(hub_id.strip().lower()):
            return family, rule
    return None


def hub_ids_in_path(path) -> Iterator[str]:
    """Hub ids named by `models--ORG--NAME` components of the path as given and as resolved."""
    path = pathlib.Path(path).expanduser()
    seen = set()
    for candidate in (path.absolute(), path.resolve()):
        for part in candidate.parts:
            match = HUB_CACHE_FOLDER.match(part)
            if match:
                hub_id = f"{match['org']}/{match['name']}"
                if hub_id not in seen:
                    seen.add(hub_id)
                    yield hub_id


def _model_card_ids(directory: pathlib.Path) -> Iterator[tuple[str, bool]]:
    """(hub id or model name, is_lineage) pairs a README.md model card states."""
    card = directory / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8", errors="replace")
    try:
        from huggingface_hub.repocard import metadata_load

        metadata = metadata_load(card) or {}
    except Exception as e:  # noqa: BLE001 - a card with broken YAML is no evidence, and no reason to fail
        log.debug("ignoring the metadata of %s (%s)", card, e)
        metadata = {}
    for entry in metadata.get("model-index") or []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            yield entry["name"], False
    title = CARD_TITLE.search(text)
    if title:
        yield title["id"], False
    base = metadata.get("base_model")
    for name in base if isinstance(base, list) else [base]:
        if isinstance(name, str):
            yield name, True


def _identity_evidence(directory: pathlib.Path, hub_id: Optional[str]) -> Iterator[tuple[str, str]]:
    """(identity, where it was read) in the order of precedence."""
    if hub_id:
        yield hub_id, "the hub id given"
    for found in hub_ids_in_path(directory):
        yield found, "the hub id in the path (Hugging Face cache layout)"
    for found, is_lineage in _model_card_ids(directory):
        yield found, ("the model card's base_model" if is_lineage else "the model card") + " (README.md)"
    config = directory / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text(encoding="utf-8")).get("_name_or_path")
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            name = None
        if isinstance(name, str) and HUB_ID.match(name):
            yield name, "config.json's _name_or_path"


def _rule_from_identity(identity: str, where: str) -> Optional[str]:
    if identity.strip().lower() == "instructor":  # the hkunlp cards' model-index name
        return "instructor"
    family = family_of(identity)
    if family is None:
        return None
    if "base_model" in where and family[0] != "INSTRUCTOR":
        return None  # INSTRUCTOR descends from GTR: a GTR base says nothing about a fine-tune's pooling
    return family[1]


def decide_pooling_rule(directory, pooling_config: dict, *, recorded_rule: Optional[str] = None,
                        hub_id: Optional[str] = None, override: Optional[str] = None,
                        override_source: str = "pooling_rule=") -> PoolingDecision:
    """The pooling rule for a sentence-transformers directory; see the module docstring for the order.

    `recorded_rule` is the rule in our own instructor_jax.json beside the files, if there is one.
    """
    directory = pathlib.Path(directory)
    if override is not None:
        if override not in POOLING_RULES:
            raise ValueError(f"pooling rule must be one of {POOLING_RULES}, got {override!r}")
        return PoolingDecision(override, f"given as {override_source}")
    include_prompt = pooling_config.get("include_prompt")
    if include_prompt is not None and not isinstance(include_prompt, bool):
        raise ValueError(f"{directory}: the pooling config's include_prompt is {include_prompt!r}, not true or "
                         "false; fix the file, or " + OVERRIDE_ADVICE)
    if recorded_rule is not None:
        if include_prompt is not None and include_prompt != (recorded_rule == "none"):
            raise ValueError(
                f"{directory}: the pooling config says include_prompt {str(include_prompt).lower()}, but "
                f"instructor_jax.json records pooling rule {recorded_rule!r}; one of them was edited. Fix the "
                "one that is wrong, or " + OVERRIDE_ADVICE)
        return PoolingDecision(recorded_rule, "recorded in instructor_jax.json beside the files")
    if include_prompt is not None:
        rule = "none" if include_prompt else "sentence-transformers"
        return PoolingDecision(rule, f"the pooling config sets include_prompt {str(include_prompt).lower()}")
    for identity, where in _identity_evidence(directory, hub_id):
        rule = _rule_from_identity(identity, where)
        if rule is not None:
            return PoolingDecision(rule, f"{where} names {identity!r}")
    return PoolingDecision("instructor", "nothing in the files or the path names the model, and instructor-jax "
                                         "applies INSTRUCTOR's pooling to any directory, as InstructorEmbedding's "
                                         "INSTRUCTOR(path) does (a GTR model used without instructions gets the "
                                         "same embeddings either way)")


def add_pooling_rule_argument(parser) -> None:
    """The `--pooling_rule` flag every command that loads a model takes: it overrides the evidence."""
    parser.add_argument("--pooling_rule", choices=POOLING_RULES,
                        help="which tokens the mean pooling covers: 'instructor' (text only, InstructorEmbedding "
                             "1.0.1), 'sentence-transformers' (text only, prompt= semantics) or 'none' (the "
                             "instruction too, as GTR). Default: decided from the checkpoint's files, its hub id "
                             "or model card, else 'instructor'; a log line says which and why")
