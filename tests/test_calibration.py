"""The automatic backend choice: timed on this machine, decided by a stated rule, cached, the same on every rank."""

import json
import os
import textwrap

import pytest

import sparsemup as smp
import sparsemup.sparse.backend as backend_module
from helpers import block_gpt, torchrun
from sparsemup.sparse import calibration, native
from sparsemup.sparse.backend import auto_choice, get_backends, sparsify
from sparsemup.sparse.calibration import MARGIN, LayerCase, calibrated, decide


def test_the_rule_keeps_a_sparse_backend_only_where_it_clearly_wins():
    assert decide({"masked_dense": 100.0, "rows": 100 / MARGIN}) == "rows"
    assert decide({"masked_dense": 100.0, "rows": 100 / MARGIN + 1}) == "masked_dense"  # within the noise margin
    assert decide({"masked_dense": 100.0, "rows": 50.0, "blocks": 40.0}) == "blocks"
    assert decide({"masked_dense": 100.0, "rows": 40.0, "blocks": 40.0}) == "blocks"  # ties break by name
    assert decide({"masked_dense": 100.0, "rows": None}) == "masked_dense"  # a backend that cannot run
    assert decide({"masked_dense": None, "rows": 5.0}) == "rows"


def test_timings_are_measured_once_per_machine_and_case(tmp_path):
    case = LayerCase((256, 256), 0.25, "fp32", ("rows",))
    other = LayerCase((256, 512), 0.25, "fp32", ("blocks", "rows"), 16)
    calls = []

    def measure(c, backend):
        calls.append((c, backend))
        return {"masked_dense": 10.0, "rows": 2.0, "blocks": 1.0}[backend]

    assert calibrated([case, other], measure, tmp_path) == {case: "rows", other: "blocks"}
    assert len(calls) == 5
    assert calibrated([case, other], measure, tmp_path) == {case: "rows", other: "blocks"}
    assert len(calls) == 5  # from the cache
    (cache,) = tmp_path.glob("*.json")
    assert json.loads(cache.read_text())[case.key()] == {"masked_dense": 10.0, "rows": 2.0}
    cache.write_text('{"torn')  # a kill mid-write elsewhere: measured again, never an error
    assert calibrated([case], measure, tmp_path) == {case: "rows"} and len(calls) == 7


def test_auto_applies_the_calibrated_choice_per_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMUP_CACHE", str(tmp_path))

    def measure(case, backend):  # pretend rows win where in > out (the MLP's down projection) only
        return 1.0 if backend == "rows" and case.shape[1] > case.shape[0] else 10.0

    monkeypatch.setattr(backend_module, "time_case", measure)
    model = block_gpt()
    choice = sparsify(model, "auto")
    names = [n for n, info in smp.get_parameterization(model).params.items() if info.masked]
    assert {choice[n] for n in names if n.endswith("mlp.proj.weight")} == {"rows"}
    assert {choice[n] for n in names if not n.endswith("mlp.proj.weight")} == {"masked_dense"}
    assert get_backends(model) == choice


def test_auto_really_times_this_machine(tmp_path, monkeypatch):
    native.load()  # the kernels from the usual cache (built once for the suite), the calibration in tmp_path
    monkeypatch.setenv("SPARSEMUP_CACHE", str(tmp_path))
    model = block_gpt(density=0.25)
    choice = sparsify(model, "auto")
    (cache,) = (tmp_path / "calibration").glob("*.json")
    timings = json.loads(cache.read_text())
    assert all(set(t) == {"masked_dense", "blocks", "rows"} and t["masked_dense"] > 0 for t in timings.values())
    assert set(choice.values()) <= {"masked_dense", "blocks", "rows"}
    assert sorted({decide(t) for t in timings.values()}) == sorted(set(choice.values()))


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from helpers import block_gpt
    import sparsemup.sparse.backend as backend_module

    dist.init_process_group("gloo")
    rank = dist.get_rank()

    def measure(case, backend):
        if rank != 0:
            raise AssertionError("only rank 0 measures")
        return 1.0 if backend == "rows" else 10.0

    backend_module.time_case = measure
    model = block_gpt()
    choice = backend_module.sparsify(model, "auto")
    with open(os.path.join({out!r}, f"choice{{rank}}.json"), "w") as f:
        json.dump(choice, f, sort_keys=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_every_process_of_a_job_runs_rank_zeros_choice(tmp_path):
    script = tmp_path / "choose.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    # Injected timings: the kernels are not needed (and would be built again in the empty cache).
    torchrun([str(script)], tmp_path, env={"SPARSEMUP_CACHE": str(tmp_path / "cache"), "SPARSEMUP_NATIVE": "0"})
    choices = [json.loads((tmp_path / f"choice{rank}.json").read_text()) for rank in (0, 1)]
    assert choices[0] == choices[1] and set(choices[0].values()) == {"rows"}


def test_auto_choice_skips_layers_without_a_sparse_twin(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEMUP_CACHE", str(tmp_path))
    model = block_gpt()
    assert auto_choice(model, {}, None, lambda c, b: 1.0) == {}
    assert calibration.cache_dir() == tmp_path / "calibration"
