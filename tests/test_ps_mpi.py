"""The MPI transport (`minasgd.ps.mpi`) end to end: real `mpiexec` jobs on this machine.

Every test launches `mpiexec -n 2|3` as a subprocess with a timeout (the pytest process itself
never initializes MPI). They need the MPI extra, `pip install -e ".[mpi]"` (mpi4py and an MPI
with `mpiexec`, e.g. the mpich wheel), and are skipped with that reason when it is missing
(unless MINASGD_REQUIRE_MPI=1, as in CI: then they fail). The
dataset is a tiny shapes set and the model `micro`, so each job takes a few seconds.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from minasgd import backends, checkpoint
from minasgd.model import Model

TIMEOUT = 120  # seconds for any one mpiexec job
DATA = "shapes:200,50"


def _mpi_missing():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed"
    from minasgd.ps.mpi import mpiexec_command

    try:
        mpiexec_command(2)
    except (ValueError, OSError, subprocess.SubprocessError) as e:
        return str(e)
    return None


MISSING = _mpi_missing()
REQUIRED = os.environ.get("MINASGD_REQUIRE_MPI") == "1"  # CI: a missing MPI fails, never skips
needs_mpi = pytest.mark.skipif(MISSING is not None and not REQUIRED,
                               reason=f"the MPI extra is not installed ({MISSING}): pip install -e '.[mpi]'")


def test_mpi_is_there_when_required():
    assert not (REQUIRED and MISSING), f"MINASGD_REQUIRE_MPI=1 but {MISSING}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One BLAS thread per rank, the CUDA simulator, and a shared data folder for the shapes set."""
    return {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "NUMBA_ENABLE_CUDASIM": "1", "MINASGD_DATA": str(tmp_path_factory.mktemp("data"))}


def mpiexec(n, args, env, cwd):
    """Run `mpiexec -n n python ARGS...`; returns the CompletedProcess (stdout and stderr as text)."""
    from minasgd.ps.mpi import mpiexec_command

    command, mpi_env = mpiexec_command(n)
    return subprocess.run([*command, sys.executable, *map(str, args)], capture_output=True, text=True,
                          env={**mpi_env, **env}, cwd=cwd, timeout=TIMEOUT)


def train(n, tmp_path, env, *extra):
    return mpiexec(n, ["-m", "minasgd", "train", "--transport", "mpi", "--model", "micro", "--dataset", DATA,
                       "--epochs", 3, "--batch-size", 16, "--nsync", 2, "--quiet", "--out", tmp_path / "run",
                       *extra], env, tmp_path)


@needs_mpi
@pytest.mark.parametrize("sync", [False, True], ids=["async", "sync"])
def test_train_over_mpi_writes_the_run(tmp_path, env, sync):
    done = train(3, tmp_path, env, "--sync" if sync else "--async")
    assert done.returncode == 0, done.stdout + done.stderr
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"metrics.jsonl", "model.npz", "summary.json"}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["ps"]["transport"] == "mpi" and summary["workers"] == 2 and summary["nsync"] == 2
    assert summary["mode"] == ("sync" if sync else "async")
    assert summary["pushes"] >= 10 and summary["rejected"] == 0
    assert summary["steps"] >= 3 * (200 // 16)
    assert sum(summary["staleness"].values()) == summary["pushes"]
    if sync:
        assert summary["staleness"] == {"0": summary["pushes"]}
    assert sorted(w["name"].split(" on ")[0] for w in summary["worker_stats"]) == ["rank 1", "rank 2"]
    assert all(w["left"] in ("finished", "training finished") for w in summary["worker_stats"])
    kinds = {json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert {"epoch", "server"} <= kinds
    ckpt = checkpoint.load(run / "model.npz", expect_fingerprint=Model("micro", backends.get("numpy")).fingerprint())
    assert ckpt["meta"]["steps"] == summary["steps"]
    assert done.stderr.strip() == "" or "Warning" in done.stderr, done.stderr  # the workers stay quiet


@needs_mpi
def test_workers_must_match_the_job_size(tmp_path, env):
    done = train(3, tmp_path, env, "--workers", 4)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "--workers 4 does not match the MPI job" in lines[0], lines


@needs_mpi
def test_a_server_that_cannot_start_stops_every_rank_with_one_line(tmp_path, env):
    done = mpiexec(3, ["-m", "minasgd", "train", "--transport", "mpi", "--model", "micro", "--dataset", "mnist",
                       "--quiet", "--out", tmp_path / "run"], env, tmp_path)
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "unknown dataset" in lines[0], lines


@needs_mpi
def test_without_mpiexec_the_error_says_how_to_launch(tmp_path, env):
    done = subprocess.run([sys.executable, "-m", "minasgd", "train", "--transport", "mpi", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode == 2 and "mpiexec -n 3 minasgd train --transport mpi" in done.stdout, done.stdout


def test_without_mpi4py_the_error_says_what_to_install(tmp_path, env):
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from minasgd.cli import main\n"
            "sys.exit(main(['train', '--transport', 'mpi', '--quiet']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=TIMEOUT)
    assert done.returncode == 2 and "pip install mpi4py mpich" in done.stdout, done.stdout


CONVERSATION = textwrap.dedent("""
    import json, sys
    import numpy as np
    from mpi4py import MPI
    from minasgd.ps.mpi import MpiServer, final_barrier
    from minasgd.ps.mpi_client import MpiClient
    from minasgd.ps.server import ParameterServer
    from minasgd.ps.tcp import ServerError

    N, FP = 1000, "toy:1000"
    comm = MPI.COMM_WORLD.Dup()
    rank = comm.Get_rank()
    if rank == 0:
        start = np.arange(N, dtype=np.float32) / N
        ps = ParameterServer(start, model_name="toy", fingerprint=FP, total_steps=3, lr=0.1, momentum=0.0,
                             expected_workers=2, worker_config={"batch_size": 8, "nsync": 3})  # npush 3 allowed
        server = MpiServer(ps, comm, timeout=20).start()
        server.join(grace=60)
        moved = start - ps.params
        print(json.dumps({"version": ps.version, "steps": ps.steps, "pushes": ps.pushes, "rejected": ps.rejected,
                          "moved": [float(moved.min()), float(moved.max())], "ended": server.exits()}), flush=True)
    else:
        client = MpiClient(comm, timeout=20)
        assert client.server_hello["num_params"] == N and client.shard is None
        config = client.hello(FP, {"name": f"hand {rank}", "npush": 3})
        params = np.zeros(N, np.float32)
        version = client.fetch_into(params)
        assert np.allclose(params, np.arange(N) / N), "fetched parameters differ"
        if rank == 1:  # a good worker: one push of all 3 mini-batches, STATS, a FETCH after the end, BYE
            comm.Recv(np.zeros(1), source=2, tag=999)  # after rank 2 was refused (so "rejected" is 1)
            reply = client.push(np.ones(N, np.float32), version, batches=3)
            assert reply["version"] == 1 and reply["done"], reply
            stats = client.stats({"loss": 1.5})
            assert stats["pushes"] == 1 and stats["rejected"] == 1, stats
            assert client.fetch_into(params) is None  # BYE, not PARAMS: its posted receive is cancelled
            client.close("finished")
        else:  # a bad one: a push of the wrong size is refused with one line
            try:
                client.push(np.ones(N + 1, np.float32), version)
                raise AssertionError("a wrong-size push was accepted")
            except ServerError as e:
                assert "1001 float32, more than the 1000 allowed" in str(e), e
            client.close("refused")
            comm.Send(np.zeros(1), dest=1, tag=999)
    final_barrier(MPI, comm, timeout=30)
""")


@needs_mpi
def test_the_conversation_and_a_refused_push(tmp_path, env):
    script = tmp_path / "conversation.py"
    script.write_text(CONVERSATION)
    done = mpiexec(3, [script], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert result["version"] == 1 and result["steps"] == 3 and result["pushes"] == 1 and result["rejected"] == 1
    assert result["moved"] == pytest.approx([1.0, 1.0])  # the ones vector as pushed, momentum 0: only rank 1's push
    assert result["ended"][0] == "training finished" and result["ended"][1].startswith("rejected:"), result["ended"]


@needs_mpi
def test_bench_ps_compares_mpi_with_the_socket(tmp_path, env):
    done = subprocess.run([sys.executable, "-m", "minasgd", "bench", "ps", "--transport", "mpi", "--model", "micro",
                           "--skip-training", "--seconds", "0.2", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["mpi_library"]
    for op in ("push", "fetch", "push+fetch"):
        r = result["goodput"][op]
        assert r["mpi"] > 0 and r["raw_mpi"] > 0 and r["ours"] > 0 and r["raw"] > 0
        assert r["mpi_vs_socket"] == pytest.approx(r["mpi"] / r["ours"])
        assert np.isfinite(r["mpi_mb_per_second"])


# Issue 13, case 1: one STATS with a 400-digit integer must get ERROR, not stop the server.
HOSTILE = (CONVERSATION
           .replace("client.push(np.ones(N + 1, np.float32), version)", "client.stats({'loss': 10**400})")
           .replace("a wrong-size push was accepted", "a 400-digit stat was accepted")
           .replace("1001 float32, more than the 1000 allowed", "out of range"))


@needs_mpi
def test_a_hostile_stats_gets_error_and_the_server_goes_on(tmp_path, env):
    assert HOSTILE != CONVERSATION
    script = tmp_path / "hostile.py"
    script.write_text(HOSTILE)
    done = mpiexec(3, [script], env, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert result["pushes"] == 1 and result["rejected"] == 1 and result["moved"] == pytest.approx([1.0, 1.0])
    assert result["ended"][1].startswith("rejected: STATS field 'loss' is out of range"), result["ended"]
