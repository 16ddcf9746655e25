"""A real one-node Slurm (Debian's slurm-wlm + munge) for tests, started as root in a private directory.

Everything lives under one temporary directory: the munge key/socket, slurm.conf, state, spool, logs. Ports are
picked free, so it neither touches /etc/slurm nor clashes with a system slurm or another test session. Clients find
it through ``SLURM_CONF`` (``cluster.env``), which ``sbatch`` also exports into the job.

    with SlurmCluster(cpus=2) as cluster:
        job = cluster.sbatch("job.sbatch", env={...})
        cluster.wait_for(job, {"COMPLETED"}, timeout=300)

Runnable by hand to poke at it: ``python tests/slurm_cluster.py cluster`` starts one and prints
``export SLURM_CONF=...`` (Ctrl-C tears it down). Needs root (slurmd runs jobs as the submitting user and must setuid)
and the binaries ``munged slurmctld slurmd sbatch scontrol sinfo`` (``.ci/install_slurm.sh`` installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from amm_trl.procs import free_port

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "srun", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"}


def missing_requirements() -> str | None:
    """Why a real slurm cannot be started here (None when it can)."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None
               and not os.path.exists(os.path.join("/usr/sbin", b))]
    if missing:
        return f"slurm/munge binaries not installed ({', '.join(missing)}); run .ci/install_slurm.sh"
    if os.geteuid() != 0:
        return "starting slurmd/slurmctld/munged needs root"
    return None


def _which(name: str) -> str:
    return shutil.which(name) or os.path.join("/usr/sbin", name)


class SlurmCluster:
    def __init__(self, cpus: int = 2, root: str | None = None, memory_mb: int = 8000, cred_expire: int = 5):
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.cred_expire = cred_expire  # also how long a requeued job waits before it may start again
        self._own_root = root is None
        self.root = root or tempfile.mkdtemp(prefix="amm-slurm-")
        os.chmod(self.root, 0o700)  # munged refuses group/world-writable directories
        self.conf = os.path.join(self.root, "slurm.conf")
        self.munge_socket = os.path.join(self.root, "munge", "munge.socket")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        inherited = [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]
        for k in inherited:
            if k != "SLURM_CONF":
                del self.env[k]  # don't inherit an outer job's settings

    # ------------------------------------------------------------------ setup
    def _write_munge(self):
        d = os.path.join(self.root, "munge")
        os.makedirs(d, mode=0o700, exist_ok=True)
        key = os.path.join(d, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        return d, key

    def _write_conf(self):
        # sched_interval=2 / bf_interval=1: a requeued job is eligible again after cred_expire + 1 s, and the default
        # 60 s main-scheduler period would leave it pending that long.
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), mode=0o755, exist_ok=True)
        r = self.root
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        host = socket.gethostname().split(".")[0]
        conf = f"""\
ClusterName=ammtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=300
SlurmctldTimeout=300
MessageTimeout=30
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        with open(self.conf, "w") as f:
            f.write(conf)

    def _spawn(self, name: str, argv: list[str]):
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "ab")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        log.close()

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        why = missing_requirements()
        if why:
            raise RuntimeError(why)
        munge_dir, key = self._write_munge()
        self._write_conf()
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--log-file={munge_dir}/munged.log",
                               f"--pid-file={munge_dir}/munged.pid", f"--seed-file={munge_dir}/munged.seed"])
        self._wait(lambda: os.path.exists(self.munge_socket), 15, "munged socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
        self._wait(lambda: self.run(["scontrol", "ping"], check=False).stdout.count("UP") > 0, timeout,
                   "slurmctld to answer")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", self.conf, "-N", "localhost"])
        self._wait(self._node_idle, timeout, "node localhost to be idle")
        return self

    def _node_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        return "localhost idle" in out

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            if pred():
                return
            time.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout", "munged.stdout"):
            p = os.path.join(self.root, "log", name)
            if os.path.exists(p):
                with open(p, errors="replace") as f:
                    out.append(f"--- {name}\n{f.read()[-tail:]}")
        return "\n".join(out)

    def stop(self):
        # cancel whatever is still queued/running so no training process outlives the cluster
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user", "root", "--full"], check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run(["squeue", "-h"], check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self._own_root and not os.environ.get("AMM_KEEP_SLURM_DIR"):
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ clients
    def run(self, argv: list[str], check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        e = dict(self.env, **(env or {}))
        return subprocess.run(argv, capture_output=True, text=True, check=check, env=e, timeout=60, **kw)

    def sbatch(self, script: str, args: list[str] = (), env: dict | None = None, cwd: str | None = None) -> str:
        """Submits `script` (a path) and returns the job id. `env` is added to the submitting environment (and so,
        with sbatch's default --export=ALL, to the job's)."""
        out = self.run(["sbatch", "--parsable", *args, script], env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, StdOut, ...); {} when unknown."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        info = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                info.setdefault(k, v)
        return info

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, states, timeout: float, poll: float = 1.0) -> dict:
        """Polls until the job is in one of `states` (or a terminal state not asked for: raises)."""
        states = set(states)
        deadline = time.monotonic() + timeout
        info = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            st = info.get("JobState")
            if st in states:
                return info
            if st in TERMINAL_STATES:
                raise RuntimeError(f"job {job_id} ended {st} (wanted {sorted(states)}): {info}")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s: {info}\n{self.logs(2000)}")

    def requeue(self, job_id: str):
        self.run(["scontrol", "requeue", str(job_id)])


# ---------------------------------------------------------------------- tiny training runs
# Shared by tests/test_slurm.py and tests/test_launchers.py: the tiny offline Llama pair of tests/tiny.py, trained
# by the real `python -m amm_trl.cli train` on 2 CPU ranks under ZeRO-3 (gloo, every parameter partitioned).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_OBJECTIVE = os.environ.get("AMM_LAUNCH_TEST_OBJECTIVE", "amm")
STEPS_PER_EPOCH = 8  # 32 rows / (2 per device x 2 ranks)

# No "train_batch_size" key: with `--deepspeed <json>` under torchrun / the deepspeed launcher, the teacher is built
# under zero.Init before deepspeed.comm is initialized, DeepSpeed then checks the filled-in train_batch_size against
# world size 1 and fails. (The accelerate path, and ACCELERATE_DEEPSPEED_CONFIG_FILE, do not hit this.)
DS_ZERO3_CPU = {
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto",
}


def tiny_assets(root: str) -> dict:
    """tests/tiny.py's student/teacher/data.jsonl under `root` (built once), plus a ZeRO-3 CPU DeepSpeed JSON and an
    accelerate config that uses it (2 processes)."""
    import json
    import sys

    done = os.path.join(root, "assets.json")
    if os.path.exists(done):
        with open(done) as f:
            return json.load(f)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tiny import build_tiny_assets

    os.makedirs(root, exist_ok=True)
    paths = build_tiny_assets(root)
    paths["ds_config"] = os.path.join(root, "ds_zero3_cpu.json")
    with open(paths["ds_config"], "w") as f:
        json.dump(DS_ZERO3_CPU, f)
    paths["accelerate_config"] = os.path.join(root, "accelerate_zero3_cpu.yaml")
    with open(paths["accelerate_config"], "w") as f:
        f.write("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                f"deepspeed_config:\n  deepspeed_config_file: {paths['ds_config']}\n  zero3_init_flag: true\n"
                "  deepspeed_multinode_launcher: standard\n"
                "machine_rank: 0\nnum_machines: 1\nnum_processes: 2\nrdzv_backend: static\nsame_network: true\n")
    with open(done, "w") as f:
        json.dump(paths, f)
    return paths


def tiny_recipe(path: str, assets: dict, output_dir: str, **overrides) -> str:
    """A recipe YAML for `amm-trl train --config`: tiny models, 4 steps, a checkpoint every 2, every step logged.
    `deepspeed=assets["ds_config"]` puts ZeRO-3 in the recipe (for torchrun / the deepspeed launcher)."""
    import yaml

    recipe = {
        "model_name_or_path": assets["student"], "teacher_model_name_or_path": assets["teacher"],
        "dataset_name": assets["data"], "objective": TEST_OBJECTIVE, "output_dir": output_dir,
        "max_steps": 4, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1,
        "per_device_train_batch_size": 2, "max_completion_length": 8, "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant", "warmup_steps": 0, "report_to": "none", "bf16": False, "use_cpu": True,
        "gradient_checkpointing": False, "seed": 0, "dataloader_num_workers": 0,
    }
    recipe.update(overrides)
    with open(path, "w") as f:
        yaml.safe_dump(recipe, f)
    return path


def launch_env(accelerate_ds_config: str | None = None) -> dict:
    """Environment for a CPU launch of `python -m amm_trl.cli`. With `accelerate_ds_config`, a DeepSpeed JSON handed
    over the way `accelerate launch --config_file <deepspeed yaml>` does (what the templates' DS_CONFIG sets);
    otherwise the recipe's `deepspeed:` key (`--deepspeed`) is the way in."""
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if accelerate_ds_config:
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=accelerate_ds_config,
                   ACCELERATE_DEEPSPEED_ZERO3_INIT="true")
    return env


def logged_steps(log_text: str) -> list[int]:
    """Optimizer steps whose training log line (`{'loss': ..., 'epoch': 'x'}`, printed by rank 0) is in the text."""
    import re

    epochs = re.findall(r"\{'loss': [^}]*'epoch': '([0-9.e+-]+)'\}", log_text)
    return [round(float(e) * STEPS_PER_EPOCH) for e in epochs]


def final_weights(output_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "model.safetensors"))


def trainer_state(checkpoint_dir: str) -> dict:
    import json

    with open(os.path.join(checkpoint_dir, "trainer_state.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------------- stand-ins
# Cheap stand-ins for the launcher machinery (they need no model): `standin_train` behaves like `amm-trl train` as far
# as a launcher can tell (gloo process group over the torchrun/accelerate env, checkpoint-N/trainer_state.json every
# save_steps, `--resume_from_checkpoint`), `standin_vllm` answers GET /health like a vLLM server.

def standin_train(argv: list[str]):
    import argparse
    import json

    import torch
    import torch.distributed as dist
    import yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("command")
    ap.add_argument("--config")
    ap.add_argument("--output_dir")
    ap.add_argument("--max_steps", type=int)
    ap.add_argument("--save_steps", type=int)
    ap.add_argument("--resume_from_checkpoint")
    args, rest = ap.parse_known_args(argv)
    cfg = yaml.safe_load(open(args.config)) if args.config else {}
    out = args.output_dir or cfg["output_dir"]
    max_steps = args.max_steps or cfg.get("max_steps", 4)
    save_steps = args.save_steps or cfg.get("save_steps", 2)
    sleep = float(os.environ.get("STANDIN_STEP_SLEEP", cfg.get("standin_step_sleep", 0.2)))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    step = 0
    if args.resume_from_checkpoint:
        with open(os.path.join(args.resume_from_checkpoint, "trainer_state.json")) as f:
            step = json.load(f)["global_step"]
        print(f"[standin] rank {rank} resumed from global_step {step}", flush=True)
    acc = torch.zeros(1)
    while step < max_steps:
        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        acc += t
        step += 1
        time.sleep(sleep)
        if rank == 0:
            print(f"[standin] step {step}/{max_steps} allreduce={t.item()}", flush=True)
        if step % save_steps == 0 or step == max_steps:
            dist.barrier()
            if rank == 0:
                ck = os.path.join(out, f"checkpoint-{step}")
                os.makedirs(ck, exist_ok=True)
                with open(os.path.join(ck, "trainer_state.json"), "w") as f:
                    json.dump({"global_step": step}, f)
            dist.barrier()
    if rank == 0:
        with open(os.path.join(out, "standin_result.json"), "w") as f:
            json.dump({"world_size": world, "global_step": step, "argv": argv,
                       "env": {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")}}, f)
    dist.destroy_process_group()


def standin_vllm(argv: list[str]):
    import argparse
    from http.server import BaseHTTPRequestHandler, HTTPServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    args, _ = ap.parse_known_args(argv)

    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path.rstrip("/") == "/health" else 404)
            self.end_headers()

    print(f"[standin-vllm] serving {args.host}:{args.port} argv={argv}", flush=True)
    HTTPServer((args.host, args.port), H).serve_forever()


def _serve_cluster():
    c = SlurmCluster()
    c._own_root = False
    try:
        c.start()
        print(f"export SLURM_CONF={c.conf}\n# slurm is up (root {c.root}); Ctrl-C to stop", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":
    import sys

    cmd = sys.argv[1] if len(sys.argv) > 1 else "cluster"
    if cmd == "standin-train":
        standin_train(sys.argv[2:])
    elif cmd == "standin-vllm":
        standin_vllm(sys.argv[2:])
    else:
        _serve_cluster()
