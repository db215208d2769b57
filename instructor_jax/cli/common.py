"""What several subcommands share: the pooling-rule flag. (The multi-process flags are
`runtime.process_flags`': the search and mining commands take them too.)"""

from __future__ import annotations


def add_pooling_rule_argument(parser) -> None:
    from instructor_jax.model.tokenization import POOLING_RULES

    parser.add_argument("--pooling_rule", choices=POOLING_RULES,
                        help="which tokens the mean pooling covers: 'instructor' (text only, InstructorEmbedding "
                             "1.0.1), 'sentence-transformers' (text only, prompt= semantics) or 'none' (the "
                             "instruction too, as GTR). Default: decided from the checkpoint's files, its hub id "
                             "or model card, else 'instructor'; a log line says which and why")
