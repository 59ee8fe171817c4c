"""Run a ``train/`` script as a user does: a subprocess on the CPU with one config."""

import subprocess
import sys
from pathlib import Path

from tests.processes import cpu_env

REPO = Path(__file__).resolve().parents[2]


class ScriptRunner:
    """``runner(*flags, config=None, check=True)`` runs ``train/<script>`` with ``--noprogress``
    and ``--config=config`` (None: the runner's config file; "": no ``--config``).

    Set ``cache_dir`` (the first run's fixture does) and later runs reuse the compiled
    functions of earlier ones through JAX's persistent compilation cache.
    """

    def __init__(self, script: str, config: Path):
        self.script = REPO / "train" / script
        self.config = config
        self.cache_dir: Path | None = None

    def _command(self, args, config) -> tuple[list[str], dict[str, str]]:
        env = cpu_env()
        if self.cache_dir is not None:
            env |= {
                "JAX_COMPILATION_CACHE_DIR": str(self.cache_dir),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            }
        config = self.config if config is None else config
        command = [sys.executable, str(self.script), "--noprogress"]
        if config != "":  # "": no --config, as a user sampling a saved run types it
            command.append(f"--config={config}")
        return command + [str(a) for a in args], env

    def start(self, *args, config=None) -> subprocess.Popen:
        """The same run in the background, its output piped (text)."""
        command, env = self._command(args, config)
        pipe = subprocess.PIPE
        return subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, cwd=REPO, env=env)

    def __call__(self, *args, config=None, check=True) -> subprocess.CompletedProcess:
        command, env = self._command(args, config)
        proc = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{self.script.name} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc
