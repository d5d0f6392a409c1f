"""Data-parallel retraining under torchrun (gloo, CPU) and the helpers the search uses for α."""
import json
import os
import socket
import subprocess
import sys

import torch

from ernas import distributed as D


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_helpers_are_no_ops_on_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = D.setup("cpu")
    assert not info.enabled and info.rank == 0 and info.device == "cpu"
    assert D.is_main() and D.world_size() == 1 and not D.is_dist()
    p = torch.nn.Parameter(torch.arange(3.0))
    p.grad = torch.ones(3)
    D.sync_parameters([p])
    D.average_gradients([p])
    assert torch.equal(p.grad, torch.ones(3)) and D.all_reduce_mean(2.5) == 2.5
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(7) == [7]
    D.barrier()
    D.cleanup()


def _worker(rank, world, init_file, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    info = D.setup("cpu")
    alpha = torch.nn.Parameter(torch.full((4,), float(rank + 1)))  # differs per rank
    D.sync_parameters([alpha])
    alpha.grad = torch.full((4,), float(rank + 1))
    unused = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank
    D.average_gradients([alpha, unused])
    result = {"rank": info.rank, "alpha": alpha.tolist(), "grad": alpha.grad.tolist(),
              "unused": unused.grad.tolist(), "mean": D.all_reduce_mean(float(rank)),
              "obj": D.broadcast_object({"from": rank}), "main": D.is_main()}
    torch.save(result, f"{out}/{rank}.pt")
    D.cleanup()


def test_alpha_helpers_on_two_processes(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert r0["alpha"] == r1["alpha"] == [1.0] * 4           # broadcast from rank 0
    assert r0["grad"] == r1["grad"] == [1.5] * 4             # mean of 1 and 2
    assert r0["unused"] == [0.0, 0.0] and r0["mean"] == r1["mean"] == 0.5
    assert r0["obj"] == r1["obj"] == {"from": 0}
    assert r0["main"] and not r1["main"]


def test_torchrun_retrain_two_ranks(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), "-m", "ernas.cli.retrain",
            f"hydra.run.dir={out}", "steps=6", "val_every=3", "batch_size=2", "crop=32",
            "val_crop=64", "task.max_side=256", "threads=1", "progress=false", "device=cpu"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["weights_identical_across_ranks"]
    assert s["images"] == 6 * 2 * 2 and s["steps"] == 6
    # only rank 0 wrote: one set of outputs, one Hydra config, nothing left by rank 1
    names = sorted(p.name for p in out.iterdir())
    assert names == [".ernas.lock", ".hydra", "arch.yaml", "best.pt", "curves.png", "init_report.json",
                     "last.pt", "log.csv", "retrain.log", "summary.json"]
    assert not list(scratch.glob("ernas_rank*"))  # the throw-away Hydra dir of rank 1
    assert r.stdout.count("retrained ") == 1
    log = (out / "log.csv").read_text().splitlines()
    assert len(log) == 1 + len({line.split(",")[0] for line in log[1:]})  # no duplicate rows
    # two ranks see different data: the result differs from one process with the same seed
    single = subprocess.run([sys.executable, "-m", "ernas.cli.retrain",
                             f"hydra.run.dir={tmp_path / 'one'}", *args[-9:]],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    a = torch.load(out / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
