"""Device specs: built-ins, JSON round trip, size parsing."""

from __future__ import annotations

import json
import re

import pytest

from modelparallel.cost_model import (
    BUILTIN_DEVICES,
    DeviceSpec,
    get_device_spec,
    load_device_spec,
    parse_bytes,
)
from modelparallel.cost_model.device import stage_devices
from modelparallel.errors import ConfigError


@pytest.mark.parametrize("name", sorted(BUILTIN_DEVICES))
def test_builtins_round_trip(name: str, tmp_path) -> None:
    spec = get_device_spec(name)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(spec.to_dict()))
    assert load_device_spec(path) == spec
    assert get_device_spec(str(path)) == spec


def test_spec_files_carry_the_envelope_and_bare_objects_still_load(tmp_path) -> None:
    """Note [file envelope]: calibrate's files name their format and version; a hand-written
    bare object of the fields still loads."""
    from modelparallel.cost_model.device import save_device_spec

    spec = get_device_spec("h100")
    path = save_device_spec(spec, tmp_path / "h100.json")
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == ("modelparallel.device_spec", 1)
    assert load_device_spec(path) == spec
    path.write_text(json.dumps({**data, "format": "modelparallel.plan"}))
    with pytest.raises(ConfigError, match=re.escape("has format 'modelparallel.plan'; "
                                                    "expected 'modelparallel.device_spec'")):
        load_device_spec(path)
    path.write_text(json.dumps({**data, "version": 7}))
    with pytest.raises(ConfigError, match="version 7; this modelparallel reads version 1"):
        load_device_spec(path)


def test_h100_figures() -> None:
    spec = get_device_spec("H100")
    assert spec.memory_bytes == 80 * 2**30
    assert spec.flops_per_second("bfloat16") == pytest.approx(989.4e12 * 0.7)
    assert spec.flops_per_second("float16") == spec.flops_per_second("bfloat16")
    assert spec.flops_per_second("int64") == spec.flops_per_second("float32")
    assert spec.transfer_time(0) == 0
    assert spec.transfer_time(450e9) == pytest.approx(1 + 8e-6)


def test_sizes() -> None:
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("16 GB") == 16 * 10**9
    assert parse_bytes(1024) == 1024
    for bad in ("lots", "-1GiB", "0", "12 parsecs"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


def test_spec_strings_and_errors(tmp_path) -> None:
    data = get_device_spec("a100").to_dict()
    data["memory_bytes"] = "40GiB"
    data["link_bandwidth"] = "100GB/s"
    spec = DeviceSpec.from_dict(data)
    assert spec.memory_bytes == 40 * 2**30 and spec.link_bandwidth == 100e9
    with pytest.raises(ConfigError, match="unknown fields"):
        DeviceSpec.from_dict({**data, "colour": "green"})
    with pytest.raises(ConfigError, match="float32"):
        DeviceSpec.from_dict({**data, "peak_flops": {"bfloat16": 1e12}})
    with pytest.raises(ConfigError, match="unknown device"):
        get_device_spec("tpu-v9")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ConfigError, match="object"):
        load_device_spec(tmp_path / "bad.json")


def test_stage_devices_one_or_one_per_stage_with_memory() -> None:
    assert [d.name for d in stage_devices(["a100"], 3)] == ["a100"] * 3
    mixed = stage_devices(["cpu", "h100"], 2, memory="2GiB")
    assert [d.name for d in mixed] == ["cpu", "h100"]
    assert {d.memory_bytes for d in mixed} == {2 * 2**30}
    with pytest.raises(ConfigError, match="--device"):
        stage_devices(["cpu", "cpu"], 3, what="--device")
