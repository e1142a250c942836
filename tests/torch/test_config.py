"""SMP config validation: every key of the reference accepted, bad values and unsupported
features refused with the key named, SM_HP_MP_PARAMETERS over the script's dict."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelparallel.errors import ConfigError
from modelparallel.torch.config import IGNORED_KEYS, UNSUPPORTED_KEYS, SMPConfig, parse_config

ALL_KEYS = {  # every key of the reference's table, at a valid value
    "partitions": 2, "microbatches": 4, "pipeline": "simple", "optimize": "speed",
    "placement_strategy": "spread", "auto_partition": True, "default_partition": 1,
    "load_partition": False, "partition_file": "plan.json", "contiguous": True,
    "horovod": False, "memory_weight": 0.5, "ddp": True, "ddp_port": 1234,
    "ddp_dist_backend": "nccl", "active_microbatches": 3, "deterministic_server": True,
    "offload_activations": False, "activation_loading_horizon": 2,
    "tensor_parallel_degree": 1, "fp16": False, "fp16_params": False, "bf16": False,
    "shard_optimizer_state": False, "prescaled_batch": False, "skip_tracing": True,
    "delayed_parameter_initialization": False, "sharded_data_parallel_degree": 1,
    "sdp_reduce_bucket_size": 500_000_000, "sdp_param_persistence_threshold": 1_000_000,
    "sdp_max_live_parameters": 1_000_000_000, "sdp_hierarchical_allgather": True,
    "sdp_gradient_clipping": 1.0, **dict.fromkeys(IGNORED_KEYS, True),
}


def test_every_reference_key_is_accepted() -> None:
    cfg = parse_config(ALL_KEYS, env={})
    assert cfg.partitions == 2 and cfg.pipeline == "simple" and cfg.schedule == "gpipe"
    assert cfg.ignored == dict.fromkeys(IGNORED_KEYS, True)


def test_defaults_follow_smp() -> None:
    cfg = parse_config({"pipeline_parallel_degree": 3}, env={})
    assert (cfg.partitions, cfg.microbatches, cfg.pipeline, cfg.optimize) == \
        (3, 1, "interleaved", "memory")
    assert cfg.memory_weight == 0.8 and cfg.active_microbatches == 5
    assert parse_config({"partitions": 1, "optimize": "speed"}, env={}).memory_weight == 0.2


def test_environment_overrides_the_script() -> None:
    env = {"SM_HP_MP_PARAMETERS": json.dumps({"microbatches": 8, "partitions": 4})}
    cfg = parse_config({"partitions": 2, "microbatches": 2, "pipeline": "simple"}, env=env)
    assert (cfg.partitions, cfg.microbatches, cfg.pipeline) == (4, 8, "simple")
    assert parse_config(None, env=env).partitions == 4


def test_json_file(tmp_path: object) -> None:
    path = tmp_path / "mp.json"  # type: ignore[operator]
    path.write_text(json.dumps({"partitions": 2}))
    assert parse_config(str(path), env={}).partitions == 2


@pytest.mark.parametrize(("cfg", "words"), [
    ({"partitions": 0}, "partitions"),
    ({"partitions": 2, "microbatches": 0}, "microbatches"),
    ({"partitions": 2, "pipeline": "fast"}, "pipeline"),
    ({"partitions": 2, "optimize": "size"}, "optimize"),
    ({"partitions": 2, "placement_strategy": "DDP"}, "placement_strategy"),
    ({"partitions": 2, "ddp": "yes"}, "ddp"),
    ({"partitions": 2, "memory_weight": 1.5}, "memory_weight"),
    ({"partitions": 2, "default_partition": 2}, "default_partition"),
    ({"partitions": 2, "auto_partition": False}, "default_partition"),
    ({"partitions": 2, "ddp_port": 3000}, "ddp_port"),
    ({"partitions": 2, "active_microbatches": 0}, "active_microbatches"),
    ({"partitions": 2, "partition_file": 3}, "partition_file"),
    ({"partitions": 2, "load_partition": True}, "partition_file"),
    ({"partitions": 2, "microbatch": 4}, "did you mean 'microbatches'"),
    ({"microbatches": 2}, "partitions"),
    ({"partitions": 2, "pipeline_parallel_degree": 3}, "pipeline_parallel_degree"),
    ({"partitions": 2, "fp16": True, "bf16": True}, "fp16 and bf16"),
])
def test_bad_values_are_named(cfg: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse_config(cfg, env={})


def test_runtime_features_are_accepted() -> None:
    for key in ("fp16", "bf16", "shard_optimizer_state"):
        assert getattr(parse_config({"partitions": 2, key: True}, env={}), key) is True
    assert parse_config({"partitions": 2, "bf16": True}, env={}).precision == "bf16"
    with pytest.raises(ConfigError, match="fp16 = 'yes' must be a bool"):
        parse_config({"partitions": 2, "fp16": "yes"}, env={})


@pytest.mark.parametrize("key", sorted(UNSUPPORTED_KEYS))
def test_unsupported_features_refused_by_name(key: str) -> None:
    default = SMPConfig.__dataclass_fields__[key].default
    value = (not default) if isinstance(default, bool) else default * 2
    with pytest.raises(ConfigError, match=f"{key} = .* is not supported"):
        parse_config({"partitions": 2, key: value}, env={})


@given(st.integers(1, 8), st.integers(1, 16), st.sampled_from(["speed", "memory"]))
def test_valid_configs_round_trip(p: int, m: int, optimize: str) -> None:
    cfg = parse_config({"partitions": p, "microbatches": m, "optimize": optimize}, env={})
    assert parse_config(cfg.to_dict(), env={}) == cfg
