"""The sbatch scripts of launch/slurm/, run on this machine with fake Slurm variables, a stand-in
for ``srun`` and ``scontrol``, and 2 CPU ranks."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from jobutil import REPO, env, free_port, job_args, run

FAKE_SRUN = r'''#!{python}
"""Stand-in for srun on one machine: start the step's tasks locally with Slurm's per-task variables."""
import os, subprocess, sys

args = sys.argv[1:]
ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
extra = {{}}
with_value = {{"-n", "--ntasks", "-N", "--nodes", "--gpus", "--include", "--exclude", "--comment", "-c", "--mpi"}}
while args and args[0].startswith("-"):
    opt = args.pop(0)
    name, _, value = opt.partition("=")
    if name in with_value and not value:
        value = args.pop(0)
    if name in ("-n", "--ntasks"):
        ntasks = int(value)
    elif name == "--export":
        for item in value.split(",")[1:]:
            key, _, val = item.partition("=")
            extra[key] = val
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + str(ntasks) + " " + " ".join(sys.argv[1:]) + "\n")
procs = []
for i in range(ntasks):
    task_env = dict(os.environ, **extra, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_ID="0",
                    SLURM_STEP_NUM_TASKS=str(ntasks), SLURM_STEP_NUM_NODES="1",
                    SLURM_STEP_NODELIST=os.environ.get("SLURM_JOB_NODELIST", "localhost"))
    procs.append(subprocess.Popen(args, env=task_env))
sys.exit(max(p.wait() for p in procs))
'''

FAKE_SCONTROL = r'''#!{python}
import os, sys
sys.path.insert(0, {repo!r})
from distopt.job.dist import expand_hostlist
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("scontrol " + " ".join(sys.argv[1:]) + "\n")
if sys.argv[1:3] == ["show", "hostnames"]:
    print("\n".join(expand_hostlist(sys.argv[3])))
'''


@pytest.fixture
def slurm(tmp_path):
    """PATH with the stand-ins first, and the variables sbatch would set for 1 node x 2 tasks."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("sinfo", "#!/bin/sh\necho localhost\n")):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable, repo=str(REPO)))
        path.chmod(0o755)
    log = tmp_path / "slurm.log"
    variables = {
        "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "distopt-test", "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "1", "MASTER_PORT": str(free_port()), "FAKE_SLURM_LOG": str(log),
        "PYTHON": sys.executable, "DISTOPT_REQUEUE": "0",
    }
    return variables, log


def _check_run(tmp_path, proc, world=2, engine="ddp"):
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == world and summary["steps"] == 3 and summary["engine"] == engine
    return summary


ARGS = {"train.steps": 3, "eval.every": 0}


@pytest.mark.distributed
def test_torchrun_script(tmp_path, slurm):
    variables, log = slurm
    proc = run(["bash", "launch/slurm/torchrun.sh", *job_args(tmp_path, **ARGS)],
               env=env(**variables, NPROC_PER_NODE=2), timeout=300)
    _check_run(tmp_path, proc)
    calls = log.read_text()
    assert "scontrol show hostnames localhost" in calls
    assert "srun 1 " in calls and "--rdzv-backend=c10d" in calls and "--rdzv-endpoint=localhost:" in calls


@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])  # fsdp2: its ranks leave with MPI finalized, then os._exit
def test_mpi_script_with_mpirun(tmp_path, slurm, engine):
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install 'distopt[mpi]')")
    if shutil.which("mpirun", path=slurm[0]["PATH"]) is None:
        pytest.skip("mpirun is not on PATH")
    variables, _ = slurm
    mpi = {"MPI_LAUNCH": "mpirun", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
    proc = run(["bash", "launch/slurm/mpi.sh", *job_args(tmp_path, **ARGS, **{"engine.name": engine})],
               env=env(**variables, **mpi), timeout=300)
    _check_run(tmp_path, proc, engine=engine)


@pytest.mark.distributed
def test_deepspeed_script(tmp_path, slurm):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install 'distopt[deepspeed]')")
    variables, log = slurm
    # DDP under the DeepSpeed launcher: the launcher and the rank discovery are what is tested here.
    proc = run(["bash", "launch/slurm/deepspeed.sh", *job_args(tmp_path, **ARGS)],
               env=env(**variables, GPUS_PER_NODE=2, ENGINE="ddp", DS_ACCELERATOR="cpu"), timeout=300)
    _check_run(tmp_path, proc)
    assert "srun 2 " in log.read_text()


def test_slurm_variables_give_the_rank(tmp_path):
    from distopt.job.dist import discover, expand_hostlist

    assert expand_hostlist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    info = discover({"SLURM_PROCID": "5", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                     "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NODELIST": "node[3-4]", "SLURM_JOB_ID": "77"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 16, 1, 8)
    assert (info.master_addr, info.master_port, info.launcher) == ("node3", 20077, "slurm")
    # The batch script itself (no step id) is not a rank of a multi-task job.
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16"}).world_size == 1
    # torchrun's variables win inside an allocation.
    info = discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"})
    assert (info.rank, info.world_size) == (1, 2)


@pytest.mark.parametrize("requeue", ["1", "0"])
def test_sigterm_stops_the_launcher_and_requeues_the_job(tmp_path, slurm, requeue):
    """The handler every sbatch script sources: SIGTERM reaches the launcher (here a stand-in that
    records it), the script exits 0 after it, and the job is requeued unless DISTOPT_REQUEUE=0."""
    import signal
    import subprocess
    import time

    variables, log = slurm
    marker = tmp_path / "launcher-got-term"
    script = tmp_path / "job.sh"
    script.write_text(f"""cd {REPO}
bash -c 'trap "touch {marker}; exit 0" TERM; while true; do sleep 0.1; done' &
pid=$!
. launch/slurm/wait_and_requeue.sh
""")
    proc = subprocess.Popen(["bash", str(script)], env=env(**{**variables, "DISTOPT_REQUEUE": requeue}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert marker.exists(), out
    calls = log.read_text() if log.exists() else ""
    assert ("scontrol requeue 4242" in calls) == (requeue == "1"), calls
