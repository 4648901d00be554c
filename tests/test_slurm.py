"""Slurm: the sbatch templates (slurm/<stage>.sbatch: srun + torchrun, c10d rendezvous), the job chain
(slurm/pipeline.sh: --dependency=afterok) and the Hydra submitit sweep, on a real Slurm started here.

The module fixture starts munged, slurmctld and two slurmd on this host (Debian: apt-get install slurm-wlm munge),
each in the foreground from a private directory with its own munge key, socket, ports, state and logs, and stops
them at the end. The two slurmd (`slurmd -N <node>`, one port each: Debian's Slurm is built with multiple-slurmd
support) make a two-node cluster on one host, so `sbatch --nodes=2` runs the templates' real multi-node path: one
srun task (torchrun) per node, joined by the c10d rendezvous. Needs root (slurmd launches the jobs). Without the
binaries or root the Slurm tests are skipped; with STEERLM_REQUIRE_SLURM=1 (CI) they fail instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import HS2_SAMPLE, REPO, tiny_reward_overrides, tiny_sft_overrides

pytestmark = pytest.mark.slow

OASST = "data/oasst1/oasst1_validation_en.messages.jsonl.gz"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
NPROC = 2  # torchrun processes per job (gloo): the 2-rank runs


# ===== the local cluster =========================================================================
def _find(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/sbin", "/usr/local/sbin")
                                       if os.access(f"{d}/{name}", os.X_OK)), None)


def _unavailable(reason: str):
    if os.environ.get("STEERLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"STEERLM_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _second_node_name(first: str) -> str | None:
    """A name for the second slurmd's node that resolves to this host, as _launch.sh's rendezvous needs: the job's
    first node *name* is the c10d endpoint (on a real cluster node names are host names)."""
    for name in ("localhost", "ip6-localhost", "ip6-loopback"):
        if name == first:
            continue
        try:
            addrs = {a[4][0] for a in socket.getaddrinfo(name, None)}
        except OSError:
            continue
        if addrs and all(a.startswith("127.") or a == "::1" for a in addrs):
            return name
    return None


class Cluster:
    """A Slurm of one or two nodes (two slurmd) on this host: submit with `sbatch`, inspect with `job`, wait with
    `wait`."""

    def __init__(self, root: Path, nodes: list[str], env: dict[str, str]):
        self.root, self.nodes, self.env = root, nodes, env
        self.logs = root / "jobs"

    def cmd(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={**self.env, **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, script: str, *overrides: str, name: str, sbatch_args: tuple[str, ...] = (),
               env: dict | None = None) -> str:
        out = self.cmd("sbatch", "--parsable", f"--job-name={name}", f"--output={self.logs}/%x-%j.out",
                       *sbatch_args, f"slurm/{script}.sbatch", *overrides, env=env).stdout
        return out.strip().split(";")[0]

    def node_states(self) -> dict[str, str]:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
        return dict(line.split() for line in out.strip().splitlines())

    def job(self, job_id: str) -> dict[str, str]:
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, *job_ids: str, timeout: float = 300) -> dict[str, dict[str, str]]:
        deadline = time.time() + timeout
        while True:
            info = {j: self.job(j) for j in job_ids}
            if all(i["JobState"] in TERMINAL for i in info.values()):
                return info
            if time.time() > deadline:
                self.cmd("scancel", *job_ids, check=False)
                raise AssertionError(f"jobs still running after {timeout}s: {info}\n{self.log_tail()}")
            time.sleep(1)

    def log_tail(self, n: int = 3000) -> str:
        parts = [f"--- {p}\n{p.read_text(errors='replace')[-n:]}" for p in sorted(self.root.rglob("*.out"))]
        parts += [f"--- {p}\n{p.read_text(errors='replace')[-n:]}" for p in sorted((self.root / "log").glob("*"))]
        return "\n".join(parts)

    def assert_ok(self, info: dict[str, dict[str, str]]) -> None:
        bad = {j: (i["JobState"], i["ExitCode"]) for j, i in info.items()
               if (i["JobState"], i["ExitCode"]) != ("COMPLETED", "0:0")}
        assert not bad, f"jobs not COMPLETED 0:0: {bad}\n{self.log_tail()}"


def _slurm_conf(root: Path, host: str, nodes: dict[str, int], cpus: int, ctld_port: int) -> str:
    """`nodes`: node name -> its slurmd's port. Every node is this host (NodeAddr 127.0.0.1, NodeHostname `host`);
    the slurmd of each is `slurmd -N <name>`, with its own port, spool, pid file and log (%n: the node name)."""
    node_lines = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
                           "RealMemory=1000 State=UNKNOWN" for n, port in nodes.items())
    return f"""\
ClusterName=steerlmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/linear
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=3600
SlurmdParameters=config_overrides
{node_lines}
PartitionName=debug Nodes={",".join(nodes)} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm():
    missing = [b for b in DAEMONS + CLIENTS if _find(b) is None]
    if missing:
        _unavailable(f"Slurm/munge binaries not found: {', '.join(missing)} (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        _unavailable("the local Slurm needs root (slurmd launches the jobs)")
    # munged wants every directory above its socket world-searchable: a private 0755 dir in /tmp, not pytest's 0700 one
    root = Path(tempfile.mkdtemp(prefix="steerlm-slurm-"))
    root.chmod(0o755)
    for d in ("munge", "state", "spool", "run", "log", "jobs"):
        (root / d).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    nodes = [host] + [n for n in (_second_node_name(host),) if n]  # two slurmd when a second name resolves here
    for n in nodes:
        (root / "spool" / n).mkdir(mode=0o755)
    # every node gets all of this host's CPUs: two busy nodes oversubscribe them (fine for the tiny runs here)
    cpus = len(os.sched_getaffinity(0))
    conf = root / "slurm.conf"
    ports: list[int] = []
    while len(ports) < 1 + len(nodes):
        if (p := _free_port()) not in ports:
            ports.append(p)
    conf.write_text(_slurm_conf(root, host, dict(zip(nodes, ports[1:])), cpus, ports[0]))
    # the jobs inherit this environment (sbatch --export=ALL): no outer Slurm job's variables
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env.update(SLURM_CONF=str(conf), STEERLM_PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PATH=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    daemons: list[subprocess.Popen] = []

    def start(*cmd: str, name: str = "") -> None:
        with open(root / "log" / f"{name or Path(cmd[0]).name}.stdout", "w") as log:
            daemons.append(subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=root))

    def stop() -> None:
        if len(daemons) == 2 + len(nodes) and all(p.poll() is None for p in daemons):  # end jobs left by a failure
            try:
                subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=30)
                _wait_for(lambda: not subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True,
                                                     timeout=30).stdout.strip(), 30, "the queue to empty", root)
            except (AssertionError, subprocess.SubprocessError):
                pass
        for p in reversed(daemons):  # the slurmd, slurmctld, munged
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)

    try:
        start(_find("munged"), "--foreground", f"--socket={root}/munge/munge.socket", f"--key-file={key}",
              f"--log-file={root}/log/munged.log", f"--pid-file={root}/run/munged.pid",
              f"--seed-file={root}/munge/munged.seed")
        _wait_for(lambda: (root / "munge" / "munge.socket").exists(), 20, "munged's socket", root)
        start(_find("slurmctld"), "-D", "-c", "-f", str(conf))
        for n in nodes:
            start(_find("slurmd"), "-D", "-N", n, "-f", str(conf), name=f"slurmd-{n}")
        cluster = Cluster(root, nodes, env)
        _wait_for(lambda: cluster.node_states() == {n: "idle" for n in nodes}, 60, f"nodes {nodes} idle", root)
        yield cluster
    finally:
        stop()


def _wait_for(ready, timeout: float, what: str, root: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ready():
                return
        except (subprocess.SubprocessError, OSError):
            pass
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted((root / "log").glob("*")))
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


# ===== the sbatch templates ======================================================================
def test_reward_and_sft_jobs_run_two_ranks_under_torchrun(slurm, tiny_model_dir, tmp_path):
    """One job per stage template, 2 gloo ranks each via srun + torchrun (c10d): exit 0:0 and the outputs."""
    rm_dir, sft_dir = tmp_path / "reward", tmp_path / "sft"
    nproc = {"STEERLM_NPROC_PER_NODE": str(NPROC)}
    reward = slurm.sbatch("train_reward", *tiny_reward_overrides(tiny_model_dir, rm_dir), name="t-reward", env=nproc)
    sft = slurm.sbatch("train_sft", *tiny_sft_overrides(tiny_model_dir, sft_dir), name="t-sft", env=nproc)
    info = slurm.wait(reward, sft)
    slurm.assert_ok(info)

    assert (rm_dir / "model" / "model.safetensors").is_file()
    assert (rm_dir / "model" / "steerlm_reward.json").is_file()
    assert (rm_dir / "metrics.jsonl").read_text().strip() and (rm_dir / "eval_metrics.json").is_file()
    assert (sft_dir / "model").is_dir() and any((sft_dir / "model").glob("*.safetensors"))
    assert (sft_dir / "metrics.jsonl").read_text().strip()
    assert _summary(rm_dir)["world_size"] == NPROC and _summary(sft_dir)["world_size"] == NPROC
    for job, recipe in ((reward, "train_reward"), (sft, "train_sft")):
        name = info[job]["JobName"]
        log = (slurm.logs / f"{name}-{job}.out").read_text()
        assert f"recipe={recipe} nodes=1 nproc_per_node={NPROC} world_size={NPROC}" in log
        assert re.search(rf"rdzv={re.escape(info[job]['NodeList'])}:\d+", log), log[-2000:]
        assert f"world={NPROC}" in log, log[-3000:]  # the recipe's own start line: both ranks joined


def test_a_two_node_job_forms_one_world_across_both_slurmd(slurm, tiny_model_dir, tmp_path):
    """`sbatch --nodes=2`: _launch.sh starts one srun task per node (each slurmd launches one step task), each a
    torchrun with NPROC gloo workers, and the c10d rendezvous on the first node joins them into one 2 x NPROC world."""
    if len(slurm.nodes) < 2:
        _unavailable("no second resolvable node name for a second slurmd on this host (localhost)")
    rm_dir, world = tmp_path / "reward2n", 2 * NPROC
    job = slurm.sbatch("train_reward", *tiny_reward_overrides(tiny_model_dir, rm_dir), name="t-reward-2n",
                       sbatch_args=("--nodes=2",), env={"STEERLM_NPROC_PER_NODE": str(NPROC)})
    info = slurm.wait(job)
    slurm.assert_ok(info)

    assert info[job]["NumNodes"] == "2", info[job]
    nodes = slurm.cmd("scontrol", "show", "hostnames", info[job]["NodeList"]).stdout.split()
    assert sorted(nodes) == sorted(slurm.nodes), info[job]
    log = (slurm.logs / f"t-reward-2n-{job}.out").read_text()
    assert f"recipe=train_reward nodes=2 nproc_per_node={NPROC} world_size={world}" in log, log[-3000:]
    assert re.search(rf"rdzv={re.escape(nodes[0])}:\d+", log), log[-3000:]  # the endpoint: the job's first node
    assert f"world={world}" in log, log[-3000:]  # the recipe's start line: all 2 x NPROC ranks in one group
    for node in nodes:  # the job step (srun's torchrun) ran one task on each slurmd
        slurmd_log = (slurm.root / "log" / f"slurmd-{node}.log").read_text()
        assert f"launch task StepId={job}.0 " in slurmd_log, slurmd_log[-2000:]
    summary = _summary(rm_dir)
    assert summary["world_size"] == world and summary["strategy"] == "ddp", summary
    assert (rm_dir / "model" / "model.safetensors").is_file()
    assert (rm_dir / "model" / "steerlm_reward.json").is_file()


# ===== the job chain =============================================================================
def chain_overrides(model_dir: Path) -> list[str]:
    """Every stage in seconds on the tiny model (as tests/test_pipeline.py), in slurm/pipeline.sh's syntax."""
    return [f"model.path={model_dir}", "model.freeze_backbone=false",
            "reward.engine.precision=fp32", "reward.train.max_steps=4", "reward.train.global_batch_size=8",
            "reward.train.micro_batch_size=2", "reward.train.save_every=0",
            f"reward.data.train=[{{format: helpsteer2, path: {HS2_SAMPLE}}}]",
            f"label.input=[{{format: oasst, path: {OASST}, max_rows: 200}}]", "label.engine.precision=fp32",
            "sft.engine.precision=fp32", "sft.max_length=2048", "sft.pack_length=null", "sft.train.max_steps=3",
            "sft.train.global_batch_size=8", "sft.train.save_every=0", "sft.model.lora.save_merged=false",
            "evaluate.attributes=[verbosity,complexity]", "evaluate.n_prompts=2", "evaluate.levels=[0,4]",
            "evaluate.generation.max_new_tokens=8"]


def submit_chain(slurm, *args: str, env: dict | None = None) -> dict[str, str]:
    out = slurm.cmd("bash", "slurm/pipeline.sh", *args, env=env).stdout
    jobs = dict(line.split() for line in out.strip().splitlines())
    assert all(j.isdigit() for j in jobs.values()), out
    return jobs


def test_pipeline_chain_runs_each_stage_after_the_one_it_reads(slurm, tiny_model_dir, tmp_path):
    run = tmp_path / "pipe"
    jobs = submit_chain(slurm, "--run-dir", str(run), *chain_overrides(tiny_model_dir),
                        env={"STEERLM_NPROC_PER_NODE": str(NPROC)})
    assert list(jobs) == ["reward", "label", "sft", "evaluate"]
    deps = {st: slurm.job(j)["Dependency"] for st, j in jobs.items()}  # read before they are satisfied
    assert deps["reward"] == "(null)"
    assert deps["label"].startswith(f"afterok:{jobs['reward']}")
    assert deps["sft"].startswith(f"afterok:{jobs['label']}")
    assert set(re.findall(r"afterok:(\d+)", deps["evaluate"])) == {jobs["reward"], jobs["sft"]}, deps

    info = slurm.wait(*jobs.values(), timeout=400)
    slurm.assert_ok(info)
    order = list(jobs.values())
    for before, after in zip(order, order[1:]):
        assert info[after]["StartTime"] >= info[before]["EndTime"], (info[before], info[after])

    assert (run / "reward" / "model" / "model.safetensors").is_file()
    labeled = (run / "label" / "labeled.jsonl").read_text().splitlines()
    assert labeled and json.loads((run / "label" / "summary.json").read_text())["world_size"] == NPROC
    assert _summary(run / "sft")["world_size"] == NPROC and (run / "sft" / "model").is_dir()
    steer = json.loads((run / "evaluate" / "steerability.json").read_text())
    assert steer
    for st, j in jobs.items():
        assert (run / "slurm" / f"{st}-{j}.out").is_file()


def test_a_failed_stage_cancels_the_stages_after_it(slurm, tmp_path):
    run = tmp_path / "broken"
    jobs = submit_chain(slurm, "--run-dir", str(run), "--stages", "reward,label,sft",
                        f"reward.model.path={tmp_path / 'no_such_model'}", "reward.train.max_steps=1")
    info = slurm.wait(*jobs.values(), timeout=200)
    reward, label, sft = (info[jobs[s]] for s in ("reward", "label", "sft"))
    assert reward["JobState"] == "FAILED" and reward["ExitCode"] != "0:0", reward
    assert "no_such_model" in (run / "slurm" / f"reward-{jobs['reward']}.out").read_text()
    for st, job in (("label", label), ("sft", sft)):
        assert job["JobState"] == "CANCELLED" and job["Reason"] == "DependencyNeverSatisfied", job
        assert job["RunTime"] == "00:00:00"
        assert not (run / "slurm" / f"{st}-{jobs[st]}.out").exists()  # never started
    assert not (run / "label").exists() and not (run / "sft").exists()


# ===== the Hydra submitit launcher ===============================================================
def test_submitit_sweep_runs_one_slurm_job_per_point(slurm, tiny_model_dir, tmp_path):
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        _unavailable("hydra-submitit-launcher is not installed (pip install -e '.[slurm]')")
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_reward_overrides(tiny_model_dir, sweep) if not o.startswith("run_dir=")]
    proc = slurm.cmd(sys.executable, "recipes/train_reward.py", "-m", "hydra/launcher=submitit_slurm",
                     "hydra.launcher.partition=debug", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}",
                     "run_dir=${hydra:sweep.dir}/${hydra:sweep.subdir}", *overrides, "optim.lr=1e-4,3e-4",
                     check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for num, lr in ((0, "0.0001"), (1, "0.0003")):  # the sweeper writes the parsed values
        point = sweep / str(num)  # run_dir: one per sweep point
        assert (point / "model" / "model.safetensors").is_file(), proc.stderr[-3000:]
        assert f"optim.lr={lr}" in (point / ".hydra" / "overrides.yaml").read_text()
        assert _summary(point)["world_size"] == 1
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2 and tasks[0].endswith("_0") and tasks[1].endswith("_1"), tasks  # one job array
    slurm.assert_ok(slurm.wait(*tasks))


# ===== slurm/pipeline.sh without Slurm ===========================================================
def test_pipeline_script_wires_stages_and_routes_overrides(tmp_path):
    run = tmp_path / "r"
    proc = subprocess.run(["bash", "slurm/pipeline.sh", "--dry-run", "--run-dir", str(run), "--after", "7",
                           "--sbatch", "--partition=gpu --exclusive", "--sbatch-evaluate", "--gpus-per-node=1",
                           "model.path=/m", "reward.optim.lr=1e-5", "+sft.foo=1", "label.chunk_size=8"],
                          cwd=REPO, capture_output=True, text=True, check=True)
    lines = proc.stdout.strip().splitlines()
    assert [re.search(r"slurm/(\w+)\.sbatch", l).group(1) for l in lines] == \
        ["train_reward", "label", "train_sft", "evaluate"]
    reward, label, sft, evaluate = lines
    assert "--dependency=afterok:7" in reward and f"run_dir={run}/reward" in reward
    assert "model.path=/m" in reward and "optim.lr=1e-5" in reward and "chunk_size" not in reward
    assert "afterok:\\<reward\\>" in label and f"rm={run}/reward/model" in label and "chunk_size=8" in label
    assert "model.path=/m" not in label
    assert "afterok:\\<label\\>" in sft and "+foo=1" in sft and f"{run}/label/labeled.jsonl" in sft
    assert "afterok:\\<reward\\>:\\<sft\\>" in evaluate and f"model.path={run}/sft/model" in evaluate
    assert "--gpus-per-node=1" in evaluate and "--gpus-per-node" not in sft
    assert all("--partition=gpu --exclusive" in l and "--kill-on-invalid-dep=yes" in l for l in lines)
    assert not run.exists()

    for bad, msg in ((["ppo.kl_coef=1"], "not in --stages"), (["lr=1"], "names no stage"),
                     (["--stages", "reward,rl"], "unknown stage 'rl'")):
        proc = subprocess.run(["bash", "slurm/pipeline.sh", "--dry-run", *bad], cwd=REPO, capture_output=True,
                              text=True)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr


def test_sbatch_templates_are_valid_bash_with_one_recipe_each():
    for script in sorted((REPO / "slurm").glob("*.sbatch")):
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        recipe = re.search(r"^RECIPE=(\w+)$", text, re.M).group(1)
        assert recipe == script.stem and (REPO / "recipes" / f"{recipe}.py").is_file()
        # #SBATCH lines only count before the first command
        body = text.split(f"RECIPE={recipe}")[0]
        assert "#SBATCH --ntasks-per-node=1" in body
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "_launch.sh")], check=True)
    subprocess.run(["bash", "-n", str(REPO / "slurm" / "pipeline.sh")], check=True)
