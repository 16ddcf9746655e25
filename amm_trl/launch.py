"""`amm-trl train --accelerate_config NAME|PATH [--num_processes N] ...`: the command relaunches itself under
`accelerate launch`, as TRL's own CLI does (`trl distillation --accelerate_config zero3`).

NAME is a config shipped with amm-trl (`amm_trl/deepspeed_configs`: zero2, zero3, zero3_offload, zero3_cpu) or
with TRL (`trl/accelerate_configs`: multi_gpu, fsdp2, ...); anything else is a path. The other launch flags of
`accelerate launch` listed in `LAUNCH_FLAGS` pass through to it; every other flag goes to `amm-trl train`.
"""

import os
import tempfile
from importlib import resources

import yaml

LAUNCH_FLAGS = ("--accelerate_config", "--num_processes", "--num_machines", "--machine_rank", "--main_process_ip",
                "--main_process_port")


def packaged_configs() -> dict[str, str]:
    """{name: path} of the accelerate configs amm-trl ships, then TRL's (amm-trl's win on a shared name)."""
    found = {}
    for package in ("trl.accelerate_configs", "amm_trl.deepspeed_configs"):
        try:
            folder = resources.files(package)
        except ModuleNotFoundError:
            continue
        found.update({p.name[:-len(".yaml")]: str(p) for p in folder.iterdir() if p.name.endswith(".yaml")})
    return found


def split_launch_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(`accelerate launch` flags with their values, the rest), from `amm-trl train`'s arguments."""
    launch, rest, i = [], [], 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in LAUNCH_FLAGS:
            if not value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{flag} needs a value.")
                value, i = argv[i + 1], i + 1
            launch += [flag, value]
        else:
            rest.append(argv[i])
        i += 1
    return launch, rest


def resolve_config(value: str) -> str:
    """A packaged config name or a path -> a config file accelerate can read from any working directory (a
    relative `deepspeed_config_file` is resolved against the config's own folder, in a copy)."""
    configs = packaged_configs()
    path = configs.get(value, value)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--accelerate_config {value!r}: no such file, and no packaged config of that name "
                                f"{sorted(configs)}.")
    with open(path) as f:
        config = yaml.safe_load(f) or {}
    ds_file = (config.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if ds_file and not os.path.isabs(ds_file) and not os.path.exists(ds_file):
        config["deepspeed_config"]["deepspeed_config_file"] = os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                           os.path.basename(ds_file))
        fd, path = tempfile.mkstemp(prefix="amm-trl-accelerate-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f)
    return path


def launch(argv: list[str]) -> None:
    """Runs `accelerate launch [its flags] -m amm_trl.cli train [the rest]` and waits for it."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    if "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        raise ValueError("--accelerate_config / --num_processes start a launcher, but this process already runs under "
                         "one (LOCAL_RANK / WORLD_SIZE are set): pass those settings to your launcher instead.")
    launch_args, train_args = split_launch_args(argv)
    if "--accelerate_config" in launch_args:
        i = launch_args.index("--accelerate_config")
        launch_args[i:i + 2] = ["--config_file", resolve_config(launch_args[i + 1])]
    parsed = launch_command_parser().parse_args([*launch_args, "--module", "amm_trl.cli", "train", *train_args])
    launch_command(parsed)
