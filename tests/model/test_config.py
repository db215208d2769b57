"""Configs against transformers' own: the defaults and what a config.json that omits a field means."""

import dataclasses
import json

import pytest

from instructor_jax.model.config import NUMERICS, EncoderConfig, encoder_config_from_t5, t5_config_from_encoder


def test_encoder_config_defaults_are_t5_configs():
    from transformers import T5Config

    reference = T5Config()
    shared = [f.name for f in dataclasses.fields(EncoderConfig)
              if f.name not in NUMERICS and hasattr(reference, f.name)]
    assert {"layer_norm_epsilon", "relative_attention_max_distance", "relative_attention_num_buckets",
            "feed_forward_proj", "dropout_rate", "d_model", "num_heads"} <= set(shared)
    for name in shared:
        assert getattr(EncoderConfig(), name) == getattr(reference, name), name


@pytest.mark.parametrize("omitted", ["layer_norm_epsilon", "relative_attention_max_distance",
                                     "relative_attention_num_buckets", "feed_forward_proj", "dropout_rate"])
def test_an_omitted_field_is_read_as_transformers_reads_it(omitted):
    from transformers import T5Config

    written = t5_config_from_encoder(EncoderConfig(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                                   layer_norm_epsilon=1e-3, relative_attention_max_distance=40,
                                                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                                   dropout_rate=0.3))
    del written[omitted]
    ours = encoder_config_from_t5(json.loads(json.dumps(written)))
    theirs = T5Config.from_dict(written)
    for name in ("layer_norm_epsilon", "relative_attention_max_distance", "relative_attention_num_buckets",
                 "feed_forward_proj", "dropout_rate", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_the_attention_fields_are_written_only_where_they_are_set():
    """A model file at the defaults reads in an instructor-jax older than the attention fields; set ones
    round-trip."""
    from instructor_jax.model.config import LATER_ENCODER_DEFAULTS, InstructorConfig, tiny_config

    config = tiny_config()
    assert not set(LATER_ENCODER_DEFAULTS) & set(config.to_json()["encoder"])
    assert InstructorConfig.from_json(config.to_json()) == config
    tuned = config.replace(encoder=dataclasses.replace(config.encoder, attention="cudnn", attention_dropout_rate=0.0))
    assert tuned.to_json()["encoder"]["attention"] == "cudnn"
    assert InstructorConfig.from_json(tuned.to_json()) == tuned
