"""The multi-GPU benchmark (``benchmarks/multigpu.py``) end to end on the CPU: 2 ranks on gloo
under torchrun, the tiny decoder, 4 configurations, one of them made to fail on purpose.

Checks the JSON's structure, that our pipeline's loss and gradients equal those of
``torch.distributed.pipelining`` on the same split (a correctness check of the comparison
itself: same stage modules, same weights, same batch), and that a configuration failing on one
rank mid-step is recorded with every rank's error while the benchmark goes on. Timings are not
checked (they mean nothing on this machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "multigpu.py"
FAILING = "ilp/gpipe/2"


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("multigpu") / "multigpu-cpu-x2.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(SCRIPT), "--size", "tiny", "--steps", "1", "--warmup", "0",
           "--methods", "ilp,uniform", "--m-factors", "1", "--timeout", "60",
           "--inject-failure", f"{FAILING}:1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_record_structure(result: dict) -> None:
    assert result["benchmark"] == "multigpu"
    assert (result["ranks"], result["backend"], result["size"]) == (2, "gloo", "tiny")
    assert result["dtype"] == "bfloat16"
    assert result["optimizer"]["bytes_per_parameter"] == 8
    assert result["optimizer"]["plan_optimizer"] == "adamw"
    assert result["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert result["env"]["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert result["env"]["NVSHMEM_DISABLE_NVLS"] == "1"
    assert {"torch", "python", "modelparallel"} <= set(result["versions"])
    model = result["model"]
    assert model["parameters"] > 0 and model["layers"] == 4
    keys = [(c["method"], c["schedule"], c["m"]) for c in result["configs"]]
    assert keys == [("ilp", "gpipe", 2), ("uniform", "gpipe", 2), ("ilp", "1f1b", 2),
                    ("uniform", "1f1b", 2)]
    for c in result["configs"]:
        assert c["tokens_per_step"] == 2 * result["microbatch_size"] * model["seq_len"]
        assert c["bubble_theory"] == pytest.approx(1 / 3)
        plan = c["plan"]
        assert len(plan["predicted_peak_bytes"]) == 2 and plan["predicted_step_s"] > 0
        assert sum(plan["stage_parameters"]) == model["parameters"]


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_measurements_and_comparison(result: dict) -> None:
    ok = [c for c in result["configs"] if c["status"] == "ok"]
    assert len(ok) == 3
    for c in ok:
        for runtime in ("ours", "torch"):
            r = c[runtime]
            assert r["tokens_per_s"] > 0 and r["pipeline_step_s"] > 0
            assert len(r["pipeline_step_times_s"]) == 1
            assert len(r["busy_fraction"]) == 2 and 0 < r["bubble_simulated"] < 1
            assert r["bubble_measured"] < 1
            assert r["predicted_step_s"] == c["plan"]["predicted_step_s"]
            assert r["peak_bytes_measured"] == [None, None]  # not measured on the CPU
        assert c["ours_over_torch_tokens_per_s"] > 0
        check = c["check"]
        # Same stage modules, weights and batch: the two runtimes compute the same step.
        assert check["loss_ours"] == pytest.approx(check["loss_torch"], rel=1e-6, abs=1e-7)
        assert check["loss_abs_diff"] <= 1e-6 * abs(check["loss_ours"])
        assert len(check["grad_norm_ours"]) == 2
        assert check["grad_norm_ours"] == pytest.approx(check["grad_norm_torch"], rel=1e-5)
        assert check["grad_norm_max_rel_diff"] <= 1e-5
        assert all(g > 0 for g in check["grad_norm_ours"])
    summary = result["summary"]
    assert set(summary["ilp_over"]["uniform"]) == {"1f1b/m=2"}
    assert set(summary["ours_over_torch"]) == {"ilp", "uniform"}


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_failed_configuration_is_recorded_and_the_run_goes_on(result: dict) -> None:
    failed = result["configs"][0]
    assert f"{failed['method']}/{failed['schedule']}/{failed['m']}" == FAILING
    assert failed["status"] == "failed" and failed["phase"] == "ours timed steps"
    errors = failed["errors"]
    assert len(errors) == 2
    assert "injected failure" in errors[1]
    # The other rank learnt of it through the runtime's failure propagation, not a timeout.
    assert errors[0].startswith("PeerFailedError") and "rank 1" in errors[0]
    assert all(c["status"] == "ok" for c in result["configs"][1:])
