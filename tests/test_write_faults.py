"""Unwritable and full disks: one WriteError naming the path, the OS error and the fix; the CLI prints it without a
traceback and exits 1; nothing written before is lost. Full and read-only filesystems are real tmpfs mounts where
this process may mount, skipped with the reason otherwise."""

import contextlib
import errno
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import sweep_base, tiny_overrides
from sparsemup.cli import main
from sparsemup.core.atomic import WriteError, append_atomic, write_atomic, write_text_atomic
from sparsemup.train import checkpoint
from sparsemup.tuning.store import ResultStore, RunRecord
from sparsemup.tuning.sweep import parse_sweep, run_sweep


@contextlib.contextmanager
def tmpfs(where, size_kb, read_only=False):
    """A fresh tmpfs of ``size_kb`` at ``where``, unmounted after the block."""
    where.mkdir()
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    if shutil.which("mount") is None:
        pytest.skip("no mount command here: the full and read-only filesystem cases need one")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): needs root or CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _train(corpus, out, *overrides):
    return main(["train", "--out", str(out), "--set", *tiny_overrides(corpus, *overrides)])


def test_write_errors_name_the_path_the_os_error_and_the_fix(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def torch_like_full_disk(f):  # torch.save raises RuntimeError("unexpected pos"), the ENOSPC in its chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from err

    with pytest.raises(WriteError, match=f"cannot write {target}: No space left on device \\(ENOSPC\\); the disk "
                                         "is full"):
        write_atomic(target, torch_like_full_disk)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    with pytest.raises(WriteError, match=r"\(ENOTDIR\); a parent of that path is a file"):
        write_text_atomic(target / "run" / "config.toml", "x")
    with pytest.raises(WriteError, match=r"cannot write /proc/sparsemup: .*\(ENOENT\)"):
        append_atomic(Path("/proc/sparsemup/metrics.csv"), b"1\n")


def test_train_into_an_unwritable_place_says_so_without_a_traceback(corpus, tmp_path, capsys):
    (tmp_path / "file").write_text("a regular file")
    assert _train(corpus, tmp_path / "file" / "run") == 1
    err = capsys.readouterr().err
    assert f"sparsemup: error: cannot write {tmp_path / 'file' / 'run'}" in err and "(ENOTDIR)" in err
    assert "Traceback" not in err
    with tmpfs(tmp_path / "ro", 64, read_only=True) as ro:
        assert _train(corpus, ro / "run") == 1
        err = capsys.readouterr().err
        assert f"cannot write {ro / 'run'}" in err and "(EROFS); the filesystem is read-only" in err


def test_a_full_disk_at_a_checkpoint_stops_with_enospc_and_keeps_the_previous_one(corpus, tmp_path, capsys):
    first = tmp_path / "run"
    assert _train(corpus, first, "train.steps=3", "train.eval_every=0") == 0
    size_kb = (first / checkpoint.CHECKPOINT_NAME).stat().st_size // 1024
    with tmpfs(tmp_path / "full", size_kb * 3 // 2 + 64) as full:  # room for one checkpoint, not for two
        shutil.copytree(first, full / "run")
        capsys.readouterr()
        assert main(["train", "--resume", "--out", str(full / "run"), "--set", "train.steps=6"]) == 1
        err = capsys.readouterr().err
        assert f"cannot write {full / 'run' / checkpoint.CHECKPOINT_NAME}" in err and "(ENOSPC)" in err
        assert "Traceback" not in err and "unexpected pos" not in err
        assert checkpoint.load(full / "run")["step"] == 3
        assert not [p for p in (full / "run").iterdir() if p.name.startswith(".")]  # no temp file left


def test_an_immutable_results_store_is_named_and_its_records_kept(tmp_path):
    store = ResultStore(tmp_path / "results.jsonl")
    record: RunRecord = {"id": "a", "overrides": {}, "status": "completed", "final_val_loss": 2.0, "steps": 2,
                         "diverged_at_step": None, "seconds": 1.0, "config": {}}
    store.append(record)
    if subprocess.run(["chattr", "+i", str(store.path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem that supports it)")
    try:
        with pytest.raises(WriteError, match=f"cannot write {store.path}: .*\\(EPERM\\); the file or directory"):
            store.append({**record, "id": "b"})
    finally:
        subprocess.run(["chattr", "-i", str(store.path)], check=True)
    assert list(ResultStore(store.path).records) == ["a"]


def test_a_sweep_whose_run_cannot_be_written_stops_naming_it(corpus, tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "runs").write_text("a file where the runs' directory goes")
    spec = parse_sweep({"base": sweep_base(corpus, steps=1), "grid": {"optim.lr": ["2**-7", "2**-5"]}}, "t")
    with pytest.raises(WriteError, match=r"cannot write .*runs/\w+: .*\(ENOTDIR\)"):
        run_sweep(spec, out, log=lambda s: None)
    assert len((out / "failures.jsonl").read_text().splitlines()) == 1  # stopped at the first: the rest would fail too
