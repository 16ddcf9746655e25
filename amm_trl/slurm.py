"""Render (and submit) the slurm batch templates of `slurm/` for a recipe: `amm-trl slurm ...`.

The templates (`slurm/single_node.sbatch`, `multi_node.sbatch`, `vllm_server.sbatch`) are plain sbatch scripts
driven by environment variables (RECIPE, OUTPUT_DIR, ACCELERATE_CONFIG, NUM_GPUS, EXTRA_ARGS, ...; each template's
header lists them) and can be submitted as they are. `render()` makes a self-contained copy for one run: the
variables are written into the script as `export` lines (they win over the submitting shell's environment, so a
requeued job sees the same values) and `#SBATCH` options are replaced, added or removed.

    from amm_trl.slurm import render
    text = render("single_node", "recipes/quickstart.yaml", sbatch={"gpus-per-node": 4, "time": "02:00:00"},
                  ACCELERATE_CONFIG="deepspeed_configs/zero3.yaml", NUM_GPUS=4)

Command line (`amm-trl slurm` or `python -m amm_trl.slurm`):

    amm-trl slurm list
    amm-trl slurm render single_node --recipe R.yaml --gpus 4 --set ACCELERATE_CONFIG=... -o job.sbatch
    amm-trl slurm submit multi_node --recipe R.yaml --nodes 4 --gpus 8 --sbatch partition=gpu --sbatch account=x
    amm-trl slurm submit single_node --recipe R.yaml --cpu 2          # CPU ranks (gloo), no GPU request
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping

TEMPLATES = {
    "single_node": "one node, NUM_GPUS processes (accelerate launch or torchrun)",
    "multi_node": "srun + accelerate launch per node, c10d rendezvous on the first node",
    "vllm_server": "trainer nodes + a dedicated `trl vllm-serve` node (vllm_mode: server)",
}

# short sbatch options -> long names, so `sbatch={"c": 8}` replaces `#SBATCH --cpus-per-task=32`
_SHORT = {"A": "account", "c": "cpus-per-task", "e": "error", "G": "gpus", "J": "job-name", "N": "nodes",
          "n": "ntasks", "o": "output", "p": "partition", "q": "qos", "t": "time", "w": "nodelist",
          "x": "exclude", "C": "constraint", "d": "dependency"}
_SBATCH_RE = re.compile(r"^#SBATCH\s+(-{1,2})([A-Za-z][\w-]*)(?:[=\s]+(.*))?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RENDER_MARK = "# ---- rendered by amm-trl slurm"


def template_dir() -> str:
    """`$AMM_TRL_SLURM_DIR`, else the templates shipped in the package (`amm_trl/slurm_templates`, also reachable as
    `slurm/` in a source checkout)."""
    env = os.environ.get("AMM_TRL_SLURM_DIR")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "slurm_templates")


def find_template(template: str) -> str:
    """A template name (`single_node`, `multi_node`, `vllm_server`) or a path to a batch script."""
    if os.path.isfile(template):
        return template
    name = template[: -len(".sbatch")] if template.endswith(".sbatch") else template
    path = os.path.join(template_dir(), name + ".sbatch")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no slurm template {template!r} (looked for {path}; known: {', '.join(TEMPLATES)}; "
                                "set AMM_TRL_SLURM_DIR if the repository's slurm/ folder lives elsewhere)")
    return path


def _option_name(key: str) -> str:
    key = key.lstrip("-")
    return _SHORT.get(key, key).replace("_", "-")


def _sbatch_line(name: str, value) -> str:
    if value is True:
        return f"#SBATCH --{name}"
    return f"#SBATCH --{name}={value}"


def _header_end(lines: list[str]) -> int:
    """Index just after the last #SBATCH directive that sbatch reads (it stops at the first command line)."""
    last = 0
    for i, line in enumerate(lines):
        s = line.strip()
        if i == 0 and s.startswith("#!"):
            continue
        if s.startswith("#SBATCH"):
            last = i + 1
        elif s and not s.startswith("#"):
            break
    return last


def _recipe_output_dir(recipe: str) -> str | None:
    try:
        import yaml

        with open(recipe) as f:
            data = yaml.safe_load(f) or {}
        out = data.get("output_dir")
        return str(out) if out else None
    except Exception:
        return None


FILE_VARIABLES = {"ACCELERATE_CONFIG": "--accelerate-config", "DS_CONFIG": "--set DS_CONFIG=...", "RECIPE": "--recipe"}


def check_files(env: Mapping) -> None:
    """The files a job reads (recipe, accelerate and DeepSpeed configs) exist now: a job that finds one missing
    after hours in the queue fails with no training done."""
    for name, flag in FILE_VARIABLES.items():
        value = env.get(name)
        if value and not os.path.isfile(str(value)):
            raise SystemExit(f"amm-trl slurm: {name}={value!r} ({flag}) is not a file. Pass an existing path (the "
                             f"packaged ones are listed by `amm-trl slurm list`).")


def render(template: str, recipe: str | None, sbatch: Mapping | None = None, **env) -> str:
    """Returns the text of a batch script: `template` (a name in `TEMPLATES` or a path) with

    * `sbatch`: #SBATCH options to set (`{"nodes": 4, "time": "2:00:00", "requeue": True}`), remove (value
      `None` or `False`, e.g. `{"gpus-per-node": None}` on a CPU partition) or add; short names (`c`, `N`, `t`) work;
    * `recipe` and `**env`: exported variables (`RECIPE` = the recipe's absolute path; `NUM_GPUS=4`,
      `EXTRA_ARGS="--max_steps 10"`, ...), written after the #SBATCH block. Values are shell-quoted; paths that
      exist locally are made absolute, since the job may start in another directory.
    """
    with open(find_template(template)) as f:
        lines = f.read().splitlines()
    sbatch = {_option_name(k): v for k, v in (sbatch or {}).items()}

    end = _header_end(lines)
    out, seen = [], set()
    for i, line in enumerate(lines):
        m = _SBATCH_RE.match(line.strip()) if i < end else None
        if m:
            name = _option_name(m.group(2))
            if name in sbatch:
                seen.add(name)
                value = sbatch[name]
                if value is None or value is False:
                    continue
                line = _sbatch_line(name, value)
        out.append(line)
    new_end = _header_end(out)
    added = [_sbatch_line(k, v) for k, v in sbatch.items() if k not in seen and v is not None and v is not False]

    exports = {}
    if recipe is not None:
        exports["RECIPE"] = os.path.abspath(recipe)
    for k, v in env.items():
        if not _ENV_NAME.match(k):
            raise ValueError(f"not a shell variable name: {k!r}")
        if v is None:
            continue
        if isinstance(v, bool):
            v = int(v)
        v = str(v)
        if k in ("OUTPUT_DIR", "ACCELERATE_CONFIG", "LOG_DIR") or (os.sep in v and os.path.exists(v)):
            v = os.path.abspath(v)
        exports[k] = v
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    block = [f"{RENDER_MARK} {stamp} from {os.path.basename(find_template(template))}"]
    block += [f"export {k}={shlex.quote(v)}" for k, v in exports.items()]
    block.append("# ----")
    result = out[:new_end] + added + [""] + block + out[new_end:]
    return "\n".join(result) + "\n"


# ------------------------------------------------------------------------------------------------ command line
def _kv(items: list[str] | None, what: str) -> dict:
    result = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--{what} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        result[k] = v
    return result


def _parser(prog: str = "amm-trl slurm") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Render / submit the slurm batch templates for a recipe.")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the templates")
    for action in ("render", "submit"):
        a = sub.add_parser(action, help=("write the batch script" if action == "render"
                                          else "render it and sbatch it; prints the job id"))
        a.add_argument("template", help=f"one of {', '.join(TEMPLATES)} or a path")
        a.add_argument("--recipe", required=True, help="recipe YAML (`amm-trl train --config`)")
        a.add_argument("-o", "--output", help="where to write the script (render: default stdout; submit: default "
                       "OUTPUT_DIR/slurm/<template>.sbatch)")
        a.add_argument("--output-dir", help="run directory (OUTPUT_DIR; default: the recipe's output_dir)")
        a.add_argument("--accelerate-config", help="ACCELERATE_CONFIG, e.g. deepspeed_configs/zero3.yaml")
        a.add_argument("--launcher", choices=["accelerate", "torchrun"], help="LAUNCHER")
        a.add_argument("--nodes", type=int, help="#SBATCH --nodes")
        a.add_argument("--gpus", type=int, help="GPUs (= processes) per node: NUM_GPUS and #SBATCH --gpus-per-node")
        a.add_argument("--cpu", type=int, metavar="RANKS",
                       help="CPU run with RANKS gloo ranks per node: USE_CPU=1, no GPU request")
        a.add_argument("--time", help="#SBATCH --time")
        a.add_argument("--partition", help="#SBATCH --partition")
        a.add_argument("--job-name", help="#SBATCH --job-name (default: the recipe's file name)")
        a.add_argument("--extra-args", help="EXTRA_ARGS: appended to `amm-trl train` (recipe overrides)")
        a.add_argument("--set", action="append", metavar="KEY=VALUE", help="any template variable (repeatable)")
        a.add_argument("--sbatch", action="append", metavar="OPTION=VALUE",
                       help="any #SBATCH option; OPTION= (empty) removes it (repeatable)")
        if action == "submit":
            a.add_argument("--dry-run", action="store_true", help="write the script, print the sbatch command")
            a.add_argument("--sbatch-arg", action="append", default=[], help="extra argument for the sbatch call")
    return p


def _render_from_args(args) -> tuple[str, dict]:
    env = {}
    sbatch = {}
    output_dir = args.output_dir or _recipe_output_dir(args.recipe)
    if args.output_dir:
        env["OUTPUT_DIR"] = args.output_dir
    if args.accelerate_config:
        env["ACCELERATE_CONFIG"] = args.accelerate_config
    if args.launcher:
        env["LAUNCHER"] = args.launcher
    if args.extra_args:
        env["EXTRA_ARGS"] = args.extra_args
    if args.nodes:
        sbatch["nodes"] = args.nodes
    if args.gpus is not None:
        env["NUM_GPUS"] = args.gpus
        sbatch["gpus-per-node"] = args.gpus or None
    if args.cpu:
        env.update(USE_CPU=1, NUM_GPUS=args.cpu)
        sbatch["gpus-per-node"] = None
        sbatch["cpus-per-task"] = args.cpu
        sbatch["exclusive"] = None
    if args.time:
        sbatch["time"] = args.time
    if args.partition:
        sbatch["partition"] = args.partition
    sbatch["job-name"] = args.job_name or os.path.splitext(os.path.basename(args.recipe))[0]
    if output_dir:
        sbatch["output"] = os.path.join(os.path.abspath(output_dir), "logs", "slurm-%x-%j.out")
    env.update(_kv(args.set, "set"))
    sbatch.update({k: (v if v != "" else None) for k, v in _kv(args.sbatch, "sbatch").items()})
    check_files({**env, "RECIPE": args.recipe})
    return render(args.template, args.recipe, sbatch=sbatch, **env), {"output_dir": output_dir}


def main(argv: list[str] | None = None, prog: str = "amm-trl slurm") -> int:
    args = _parser(prog).parse_args(argv)
    if args.action == "list":
        for name, what in TEMPLATES.items():
            path = os.path.join(template_dir(), name + ".sbatch")
            print(f"{name:12s} {what}{'' if os.path.isfile(path) else '  (missing: ' + path + ')'}")
        return 0
    text, info = _render_from_args(args)
    output_dir = info["output_dir"]
    if output_dir:
        # slurm does not create the --output folder; a missing one makes the job fail without a word (also when
        # the script is rendered to stdout and submitted from a pipe)
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
    if args.action == "render":
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
            os.chmod(args.output, 0o755)
            print(args.output)
        else:
            sys.stdout.write(text)
        return 0
    path = args.output
    if not path:
        base = os.path.join(output_dir, "slurm") if output_dir else "."
        os.makedirs(base, exist_ok=True)
        path = os.path.join(base, os.path.basename(find_template(args.template)))
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    cmd = ["sbatch", "--parsable", *args.sbatch_arg, path]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return r.returncode
    job = r.stdout.strip().split(";")[0]
    print(job)
    sys.stderr.write(f"submitted {path} as job {job}"
                     + (f"; logs in {os.path.join(output_dir, 'logs')}\n" if output_dir else "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
