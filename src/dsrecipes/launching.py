"""One way to launch a recipe and one way to start a server, shared by tests/ and benchmarks/.

- `free_port()`: a free loopback TCP port (for --main_process_port, torchrun's --master_port, MASTER_PORT).
- `child_env(**extra)`: the environment of every child run: offline hub, 1 OpenMP thread, unbuffered output, the
  DeepSpeed CPU accelerator, and this venv's bin/ first on PATH (its ninja JIT-builds DeepSpeed ops).
- `launch_cmd(script, args, ...)`: `accelerate launch` with a free --main_process_port and 1 CPU thread per rank.
- `torchrun_cmd(nproc)`: a `torchrun --nproc_per_node N --master_port FREE` prefix (tensor-parallel serving).
- `run(cmd, timeout, check, **env)`: run it from the repository root; on failure raise with the stderr tail.
- `Server(args, log_path, ...)`: `python recipes/serve.py --port 0 ARGS` (or under torchrun with nproc > 1); waits
  for its `serving ... on http://HOST:PORT` line and for /health, gives an httpx client, stops with SIGTERM.

Used by tests/conftest.py, tests/serving_helpers.py and benchmarks/*.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # src/dsrecipes/ -> repo
BIN = os.path.dirname(sys.executable)
ACCELERATE = os.path.join(BIN, "accelerate")
TORCHRUN = os.path.join(BIN, "torchrun")
DS_YAML = "configs/accelerate/deepspeed_cpu_2proc.yaml"


class LaunchError(AssertionError):
    """A launched command failed or a server did not come up. An AssertionError, so a test reports a failed check."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (the OS picks it; another process may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        DS_ACCELERATOR="cpu",
    )
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")  # the venv's ninja builds DeepSpeed ops (one ninja only)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch_cmd(
    script: str,
    args: list[str],
    accelerate_config: str = DS_YAML,
    deepspeed: str | None = None,
    num_processes: int | None = None,
) -> list[str]:
    cmd = [
        ACCELERATE,
        "launch",
        "--config_file",
        accelerate_config,
        "--main_process_port",
        str(free_port()),
        "--num_cpu_threads_per_process",
        "1",
    ]
    if deepspeed:
        cmd += ["--deepspeed_config_file", deepspeed]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    return cmd + [script] + list(args)


def torchrun_cmd(nproc_per_node: int) -> list[str]:
    """The launcher prefix for N local processes (put the script and its arguments after it)."""
    return [TORCHRUN, "--nproc_per_node", str(nproc_per_node), "--master_port", str(free_port())]


def run(cmd: list[str], timeout: int = 600, check: bool = True, **env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise LaunchError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stderr tail ---\n{proc.stderr[-4000:]}")
    return proc


class Server:
    """`python recipes/serve.py --port 0 ARGS`, or under a launcher prefix (`launcher=`, or `nproc=N` for torchrun);
    output goes to log_path. Ready once it printed its URL and /health answers 200. `stop()` sends SIGTERM (the
    server drains in-flight requests) and returns the exit code."""

    def __init__(
        self,
        args: list[str],
        log_path: str,
        launcher: list[str] | None = None,
        api_key: str | None = None,
        timeout: float = 180.0,
        nproc: int = 1,
        env: dict | None = None,
    ):
        import httpx

        environ = child_env(**(env or {}))
        environ.pop("DSRECIPES_API_KEY", None)
        if api_key:
            environ["DSRECIPES_API_KEY"] = api_key
        if launcher is None:
            launcher = torchrun_cmd(nproc) if nproc > 1 else [sys.executable]
        cmd = launcher + ["recipes/serve.py", "--port", "0", *args]
        self.log_path, self.api_key = log_path, api_key
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=environ, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            self.url = self._wait_url(timeout)
            self.client = httpx.Client(
                base_url=self.url,
                timeout=120,
                trust_env=False,
                headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            )
            self._wait_healthy(60)
        except BaseException:
            self._kill()
            raise

    def _wait_url(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(self.log_path) as fh:
                for line in fh:
                    if line.startswith("serving ") and " on http://" in line:
                        return line.split(" on ")[1].split()[0]
            if self.proc.poll() is not None:
                raise LaunchError(f"server exited {self.proc.returncode}:\n{self.tail()}")
            time.sleep(0.2)
        raise LaunchError(f"server did not start in {timeout}s:\n{self.tail()}")

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.client.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise LaunchError(f"server did not become healthy:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        if not self.log.closed:
            self.log.flush()
        with open(self.log_path) as fh:
            return fh.read()[-n:]

    def post(self, path: str, body: dict, **kw):
        return self.client.post(path, json=body, **kw)

    def complete(self, prompt, **params) -> dict:
        """A greedy (unless told otherwise) /v1/completions call that must answer 200."""
        r = self.post("/v1/completions", {"prompt": prompt, "temperature": 0, **params})
        if r.status_code != 200:
            raise LaunchError(f"/v1/completions answered {r.status_code}: {r.text}")
        return r.json()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        """SIGTERM goes to the launched process (torchrun forwards it); SIGKILL to the whole process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.client.close()
        self.log.close()
        return self.proc.returncode
