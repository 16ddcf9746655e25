"""The slurm batch templates (slurm/*.sbatch) and `amm_trl.slurm` on a REAL one-node slurm.

`tests/slurm_cluster.py` starts Debian's slurm-wlm + munge as root in a private directory for this module (2 CPUs,
node `localhost`) and tears it down afterwards. The slow tests submit the templates with the tiny models of
tests/tiny.py: 2 CPU ranks (gloo) under ZeRO-3, the real `python -m amm_trl.cli train`. They are skipped, with the
reason, where the slurm binaries are missing (`.ci/install_slurm.sh` installs them) or not running as root.
The render tests at the top need no slurm.
"""

import os
import re
import subprocess
import sys
import time

import pytest

from amm_trl import slurm as amm_slurm
from slurm_cluster import (  # tests/ is on sys.path (pytest rootdir-relative import)
    REPO,
    SlurmCluster,
    final_weights,
    free_port,
    logged_steps,
    missing_requirements,
    tiny_assets,
    tiny_recipe,
    trainer_state,
)

TEMPLATES = os.path.join(REPO, "slurm")
JOB_TIMEOUT = 300  # seconds a tiny 2-rank job may take (about 30 s when the machine is idle)


def _read(path):
    with open(path, errors="replace") as f:
        return f.read()


# ------------------------------------------------------------------------------------------------ render (fast)
def test_render_rewrites_header_and_exports(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}/out\nmax_steps: 2\n")
    text = amm_slurm.render("single_node", str(recipe),
                            sbatch={"gpus-per-node": None, "c": 2, "time": "00:10:00", "partition": "debug"},
                            USE_CPU=1, NUM_GPUS=2, EXTRA_ARGS="--max_steps 3 --save_steps 'a b'")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --cpus-per-task=2" in lines and "#SBATCH --time=00:10:00" in lines
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --requeue" in lines
    assert not any("gpus-per-node" in line for line in lines)
    # sbatch stops reading directives at the first command: the exports must come after the last #SBATCH line
    last_sbatch = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    first_export = min(i for i, line in enumerate(lines) if line.startswith("export "))
    assert first_export > last_sbatch
    assert f"export RECIPE={recipe}" in lines and "export USE_CPU=1" in lines
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    subprocess.run(["bash", "-n", str(script)], check=True)
    # the quoting survives the shell
    snippet = f"eval \"$(grep '^export EXTRA_ARGS' {script})\"; printf '%s' \"$EXTRA_ARGS\""
    out = subprocess.run(["bash", "-c", snippet],
                         capture_output=True, text=True, check=True).stdout
    assert out == "--max_steps 3 --save_steps 'a b'"


def test_templates_parse_and_cli(tmp_path, capsys):
    for name in amm_slurm.TEMPLATES:
        subprocess.run(["bash", "-n", os.path.join(TEMPLATES, f"{name}.sbatch")], check=True)
        text = _read(os.path.join(TEMPLATES, f"{name}.sbatch"))
        for needle in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@90", "scontrol requeue", "latest_checkpoint",
                       "export WANDB_RUN_ID=${WANDB_RUN_ID:-amm-trl-${SLURM_JOB_ID:-local}} WANDB_RESUME="):
            assert needle in text, (name, needle)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}/out\n")
    out = tmp_path / "mn.sbatch"
    assert amm_slurm.main(["render", "multi_node", "--recipe", str(recipe), "--nodes", "4", "--gpus", "8",
                           "--accelerate-config", "deepspeed_configs/zero3.yaml", "--sbatch", "account=proj",
                           "--sbatch", "exclusive=", "-o", str(out)]) == 0
    text = out.read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text and "#SBATCH --account=proj" in text
    assert "#SBATCH --exclusive" not in text and "#SBATCH --job-name=r" in text
    assert f"#SBATCH --output={tmp_path}/out/logs/slurm-%x-%j.out" in text and (tmp_path / "out" / "logs").is_dir()
    assert "export NUM_GPUS=8" in text
    assert text.split("export ACCELERATE_CONFIG=")[1].split("\n")[0].endswith("/deepspeed_configs/zero3.yaml")
    assert amm_slurm.main(["list"]) == 0
    assert "vllm_server" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ real slurm
@pytest.fixture(scope="module")
def cluster():
    why = missing_requirements()
    if why:
        pytest.skip(why)
    c = SlurmCluster(cpus=2)
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_assets(str(tmp_path_factory.mktemp("tiny-assets")))


def _job_env(**extra):
    env = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "MAIN_PORT": str(free_port())}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _logs(output_dir, job):
    """{restart count: text} of the per-(re)start logs the templates write to OUTPUT_DIR/logs."""
    found = {}
    for name in os.listdir(os.path.join(output_dir, "logs")):
        m = re.fullmatch(rf".*-{job}-r(\d+)\.log", name)
        if m:
            found[m.group(1)] = _read(os.path.join(output_dir, "logs", name))
    return found


def _explain(cluster, output_dir, job):
    try:
        logs = "\n".join(f"==== restart {k}\n{v[-6000:]}" for k, v in _logs(output_dir, job).items())
    except OSError:
        logs = "(no logs)"
    return f"{cluster.job(job)}\n{logs}\n{cluster.logs(1500)}"


@pytest.fixture(scope="module")
def single_node_job(cluster, assets, tmp_path_factory):
    """`amm-trl slurm`-rendered single_node.sbatch, `accelerate launch` with a ZeRO-3 CPU config, 2 ranks."""
    root = tmp_path_factory.mktemp("slurm-single")
    out = str(root / "out")
    recipe = tiny_recipe(str(root / "recipe.yaml"), assets, out)
    text = amm_slurm.render("single_node", recipe, sbatch={"gpus-per-node": None, "cpus-per-task": 2,
                                                           "job-name": "tiny", "output": f"{root}/slurm-%j.out"},
                            ACCELERATE_CONFIG=assets["accelerate_config"], USE_CPU=1, NUM_GPUS=2)
    script = root / "job.sbatch"
    script.write_text(text)
    t0 = time.monotonic()
    job = cluster.sbatch(str(script), env=_job_env(), cwd=str(root))
    try:
        info = cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_explain(cluster, out, job)}") from None
    return {"job": job, "info": info, "out": out, "root": root, "seconds": time.monotonic() - t0}


@pytest.mark.slow
@pytest.mark.distributed
def test_single_node_job_completes_with_checkpoint(cluster, single_node_job):
    out, job = single_node_job["out"], single_node_job["job"]
    assert single_node_job["info"]["JobState"] == "COMPLETED"
    assert trainer_state(os.path.join(out, "checkpoint-4"))["global_step"] == 4
    assert os.path.isdir(os.path.join(out, "checkpoint-2"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))  # ZeRO-3 gathered on save
    log = _logs(out, job)["0"]
    assert "launch --config_file" in log and "--num_processes 2" in log
    assert logged_steps(log) == [1, 2, 3, 4]
    assert "(fresh start)" in log
    print(f"single-node slurm job: {single_node_job['seconds']:.1f}s")


@pytest.mark.slow
@pytest.mark.distributed
def test_requeued_job_resumes_from_checkpoint(cluster, assets, tmp_path):
    """The plain template driven by environment variables (torchrun + DS_CONFIG): requeued after its first
    checkpoint, the job restarts, resumes from that checkpoint and only runs the remaining steps."""
    out = str(tmp_path / "out")
    max_steps, save_steps = 12, 4
    recipe = tiny_recipe(str(tmp_path / "recipe.yaml"), assets, out, max_steps=max_steps, save_steps=save_steps)
    env = _job_env(RECIPE=recipe, LAUNCHER="torchrun", DS_CONFIG=assets["ds_config"], USE_CPU=1, NUM_GPUS=2)
    t0 = time.monotonic()
    job = cluster.sbatch(os.path.join(TEMPLATES, "single_node.sbatch"), env=env, cwd=str(tmp_path),
                         args=["--gpus-per-node=0", "-c", "2", "-J", "requeue", "-o", f"{tmp_path}/slurm-%j.out"])
    first = os.path.join(out, f"checkpoint-{save_steps}", "trainer_state.json")
    deadline = time.monotonic() + JOB_TIMEOUT
    while not os.path.exists(first):
        state = cluster.state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), _explain(cluster, out, job)
        assert time.monotonic() < deadline, _explain(cluster, out, job)
        time.sleep(0.2)
    cluster.requeue(job)  # what slurm does on preemption / node failure; the job is killed mid-run
    requeued_at = time.monotonic()
    try:
        info = cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_explain(cluster, out, job)}") from None
    assert info["Restarts"] == "1"
    logs = _logs(out, job)
    assert set(logs) == {"0", "1"}, logs.keys()
    first_run, second_run = logged_steps(logs["0"]), logged_steps(logs["1"])
    assert first_run[:save_steps] == list(range(1, save_steps + 1)) and len(first_run) < max_steps, first_run
    # the restart resumed from the newest complete checkpoint (the one we waited for, or a later one)...
    resumed = int(logs["1"].split("--resume_from_checkpoint ")[1].split()[0].rsplit("-", 1)[1])
    assert resumed >= save_steps and resumed % save_steps == 0
    assert resumed <= max(first_run)
    # ...and continued from its global_step, not from 0
    assert second_run == list(range(resumed + 1, max_steps + 1)), second_run
    assert trainer_state(os.path.join(out, f"checkpoint-{max_steps}"))["global_step"] == max_steps
    print(f"requeue: resumed from checkpoint-{resumed}; {time.monotonic() - t0:.1f}s total, "
          f"{time.monotonic() - requeued_at:.1f}s after the requeue")


@pytest.mark.slow
@pytest.mark.distributed
def test_multi_node_template_two_tasks(cluster, assets, single_node_job, tmp_path):
    """multi_node.sbatch as slurm would run it on two nodes: `srun` starts two `accelerate launch --num_machines 2
    --machine_rank $SLURM_PROCID --rdzv_backend c10d` tasks (here both on the one node, 1 rank each). Same recipe as
    the single-node job: same final weights."""
    out = str(tmp_path / "out")
    recipe = tiny_recipe(str(tmp_path / "recipe.yaml"), assets, out)
    env = _job_env(RECIPE=recipe, ACCELERATE_CONFIG=assets["accelerate_config"], USE_CPU=1, NUM_GPUS=1)
    t0 = time.monotonic()
    job = cluster.sbatch(os.path.join(TEMPLATES, "multi_node.sbatch"), env=env, cwd=str(tmp_path),
                         args=["--gpus-per-node=0", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "-c", "1",
                               "--exclusive=user", "-J", "mn", "-o", f"{tmp_path}/slurm-%j.out"])
    try:
        cluster.wait_for(job, {"COMPLETED"}, JOB_TIMEOUT)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_explain(cluster, out, job)}") from None
    log = _logs(out, job)["0"]
    assert "task 0/2" in log and "task 1/2" in log and "--machine_rank" in _read(os.path.join(TEMPLATES,
                                                                                              "multi_node.sbatch"))
    assert trainer_state(os.path.join(out, "checkpoint-4"))["global_step"] == 4
    a, b = final_weights(out), final_weights(single_node_job["out"])
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    print(f"multi-node template (2 srun tasks): {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_usr1_preemption_requeues_itself(cluster, tmp_path):
    """`--signal=B:USR1@90`: the batch shell traps USR1 (sent here with `scancel -s USR1 -b`, by slurm 90 s before
    the time limit), requeues its own job, and the restart resumes. Stand-in trainer (tests/slurm_cluster.py), since
    only the shell machinery is under test."""
    out = str(tmp_path / "out")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {out}\nmax_steps: 12\nsave_steps: 2\nstandin_step_sleep: 0.5\n")
    env = _job_env(RECIPE=str(recipe), LAUNCHER="torchrun", USE_CPU=1, NUM_GPUS=2, TRAIN_MODULE="slurm_cluster",
                   TRAIN_COMMAND="standin-train train", PYTHONPATH=os.path.join(REPO, "tests"))
    job = cluster.sbatch(os.path.join(TEMPLATES, "single_node.sbatch"), env=env, cwd=str(tmp_path),
                         args=["--gpus-per-node=0", "-c", "2", "-J", "usr1", "-o", f"{tmp_path}/slurm-%j.out"])
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(out, "checkpoint-2", "trainer_state.json")):
        assert time.monotonic() < deadline, _explain(cluster, out, job)
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = cluster.wait_for(job, {"COMPLETED"}, 120)
    assert info["Restarts"] == "1"
    logs = _logs(out, job)
    assert "got USR1: requeueing" in logs["0"]
    assert "resumed from global_step" in logs["1"] and "--resume_from_checkpoint" in logs["1"]


@pytest.mark.slow
@pytest.mark.parametrize("serve", ["student", "teacher"])
def test_vllm_server_template_single_node_split(cluster, tmp_path, serve):
    """vllm_server.sbatch control flow on one node (the node is split: server + trainer): the server starts, the
    script waits for /health, then the trainer runs with `--vllm_mode server --vllm_server_host <node>` (SERVE=student)
    or `--teacher_placement server --teacher_server_base_url http://<node>:PORT` (SERVE=teacher, the recipe's
    teacher served). Stand-ins for vLLM and the trainer (no GPU, no vLLM here)."""
    out = str(tmp_path / "out")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"output_dir: {out}\nmax_steps: 2\nsave_steps: 2\nmodel_name_or_path: /models/student\n"
                      "teacher_model_name_or_path: /models/teacher\nteacher_top_k: 32\n")
    port = free_port()
    env = _job_env(RECIPE=str(recipe), SERVE=serve, LAUNCHER="torchrun", USE_CPU=1, NUM_GPUS=2,
                   TRAIN_MODULE="slurm_cluster",
                   TRAIN_COMMAND="standin-train train", PYTHONPATH=os.path.join(REPO, "tests"), VLLM_PORT=port,
                   VLLM_COMMAND="python -m slurm_cluster standin-vllm --port $VLLM_PORT --model $VLLM_MODEL")
    job = cluster.sbatch(os.path.join(TEMPLATES, "vllm_server.sbatch"), env=env, cwd=str(tmp_path),
                         args=["--gpus-per-node=0", "--nodes=1", "-c", "2", "--exclusive=user", "-J", "vllm",
                               "-o", f"{tmp_path}/slurm-%j.out"])
    try:
        cluster.wait_for(job, {"COMPLETED"}, 120)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(f"{e}\n{_explain(cluster, out, job)}") from None
    log = _logs(out, job)["0"]
    assert f"vLLM server up at localhost:{port}" in log
    import json

    with open(os.path.join(out, "standin_result.json")) as f:
        result = json.load(f)
    argv = " ".join(result["argv"])
    if serve == "student":
        assert f"--use_vllm true --vllm_mode server --vllm_server_host localhost --vllm_server_port {port}" in argv
    else:
        assert (f"--teacher_placement server --teacher_server_base_url http://localhost:{port} --teacher_top_k 32"
                in argv) and "--use_vllm" not in argv
    assert result["world_size"] == 2
    server_log = _read(os.path.join(out, "logs", f"vllm-{job}-r0.vllm.log"))
    assert f"'--model', '/models/{serve}'" in server_log and "GET /health" in server_log


def test_teacher_server_command_asks_for_the_recipes_top_k(tmp_path):
    """SERVE=teacher starts `vllm serve TEACHER --max-logprobs K` with the recipe's teacher and teacher_top_k (here
    outside slurm and without vLLM: the command is logged, then the missing `vllm` ends the job)."""
    (tmp_path / "r2.yaml").write_text(f"output_dir: {tmp_path}/out\nteacher_model_name_or_path: /models/teacher\n"
                                      "teacher_top_k: 64\n")
    run = _template_without_slurm(tmp_path, "vllm_server", SERVE="teacher", RECIPE=str(tmp_path / "r2.yaml"),
                                  VLLM_TP="2", VLLM_WAIT="3", PATH=f"{tmp_path / 'bin'}:/usr/bin:/bin")
    log = " ".join((run.stdout + run.stderr).split())
    assert ("vLLM: vllm serve /models/teacher --host 0.0.0.0 --port 8000 --tensor-parallel-size 2 "
            "--data-parallel-size 1 --max-logprobs 64") in log, log[-3000:]
    assert run.returncode != 0
    bad = _template_without_slurm(tmp_path, "vllm_server", SERVE="rollouts")
    assert bad.returncode == 2 and "SERVE=rollouts: use student (rollouts) or teacher" in bad.stderr


def test_render_to_stdout_creates_the_log_folder_and_missing_files_are_refused(tmp_path, capsys):
    """`#SBATCH --output` points into OUTPUT_DIR/logs, which slurm does not create: rendering to stdout (to pipe
    into sbatch) creates it too. A configuration file that does not exist is refused now, not after the queue."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}/out\n")
    assert amm_slurm.main(["render", "single_node", "--recipe", str(recipe), "--gpus", "2"]) == 0
    assert "#SBATCH --output=" in capsys.readouterr().out and (tmp_path / "out" / "logs").is_dir()
    with pytest.raises(SystemExit, match=r"ACCELERATE_CONFIG='deepspeed_configs/zero4\.yaml' \(--accelerate-config\) "
                                         r"is not a file"):
        amm_slurm.main(["render", "single_node", "--recipe", str(recipe), "--accelerate-config",
                        "deepspeed_configs/zero4.yaml"])
    with pytest.raises(SystemExit, match=r"RECIPE='.*missing\.yaml' \(--recipe\) is not a file"):
        amm_slurm.main(["render", "single_node", "--recipe", str(tmp_path / "missing.yaml")])


def _template_without_slurm(tmp_path, template, **env):
    """Runs a template with bash outside slurm: `scontrol show hostnames` answers one node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho node1\n")
    (bin_dir / "scontrol").chmod(0o755)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path}/out\nmodel_name_or_path: /models/student\n")
    full = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "RECIPE": str(recipe),
            "SLURM_JOB_NODELIST": "node1", "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", os.path.join(TEMPLATES, f"{template}.sbatch")], env=full, capture_output=True,
                          text=True, timeout=60)


def test_vllm_server_on_one_node_refuses_more_gpus_than_the_node_has(tmp_path):
    run = _template_without_slurm(tmp_path, "vllm_server", SLURM_GPUS_ON_NODE="8", NUM_GPUS="8", VLLM_TP="2")
    assert run.returncode == 2, run.stderr[-2000:]
    assert ("one node with 8 GPUs: NUM_GPUS=8 training processes plus the server's VLLM_TP x VLLM_DP = 2 GPUs do "
            "not fit. On one node NUM_GPUS counts the trainer's GPUs only: pass NUM_GPUS=6") in run.stderr


def test_setup_snippets_may_read_unset_variables(tmp_path):
    """SETUP (conda/module activation) runs before `set -u`: a snippet reading an unset variable does not kill the
    job (it then stops at the next check, the missing recipe, which proves SETUP ran through)."""
    run = _template_without_slurm(tmp_path, "single_node", SETUP='echo "setup ran ${AMM_UNSET_VARIABLE}"; '
                                  'echo "$AMM_UNSET_VARIABLE" > /dev/null', RECIPE="")
    assert "setup ran" in run.stdout + run.stderr and "unbound variable" not in run.stderr, run.stderr
    assert "set RECIPE to a recipe YAML" in run.stderr
