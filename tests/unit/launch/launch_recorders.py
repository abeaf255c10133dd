"""Command recorders standing in for srun/torchrun/deepspeed/ssh/scontrol in the launcher tests."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from megavid.launch.env import is_secret_name

REPO = Path(__file__).resolve().parents[3]

RECORDER = """#!{python}
# stands in for `{name}`: records its argv (and the launch-relevant environment), then
# waits for SIGTERM like a running job step would when RECORDER_WAIT={name}
import json, os, signal, sys, time
entry = {{"argv": [os.path.basename(sys.argv[0])] + sys.argv[1:],
          "env": {{k: v for k, v in os.environ.items() if k.startswith(("DS_ENV_FILE", "GLOO_", "NCCL_"))}}}}
with open(os.environ["RECORD_FILE"], "a") as f:
    f.write(json.dumps(entry) + "\\n")
if os.environ.get("RECORDER_WAIT") == "{name}":
    def on_term(*_):
        with open(os.environ["RECORD_FILE"], "a") as f:
            f.write(json.dumps({{"signal": "TERM", "argv": [os.path.basename(sys.argv[0])]}}) + "\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    with open(os.environ["RECORD_FILE"] + ".ready", "w"):
        pass
    time.sleep(60)
"""


class Recorders:
    """A bin/ folder of recorders (first on PATH) and the calls they saw."""

    def __init__(self, root: Path, names: tuple[str, ...]) -> None:
        self.bin = root / "bin"
        self.bin.mkdir()
        self.file = root / "calls.jsonl"
        for name in names:
            p = self.bin / name
            p.write_text(RECORDER.format(python=sys.executable, name=name))
            p.chmod(0o755)

    def calls(self) -> list[dict]:
        if not self.file.exists():
            return []
        return [json.loads(line) for line in self.file.read_text().splitlines()]

    def env(self, **extra: str) -> dict[str, str]:
        """A clean environment: recorders, then the venv, then the system; no SLURM_* leaks in."""
        # no secret from the shell that runs the tests: over several nodes it would be copied by ssh
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "MASTER_", "NCCL_", "GLOO_")) and not is_secret_name(k)}
        base["PATH"] = os.pathsep.join([str(self.bin), str(Path(sys.executable).parent), base.get("PATH", "")])
        base["RECORD_FILE"] = str(self.file)
        base["MEGAVID_PYTHON"] = sys.executable
        base["TMPDIR"] = str(self.bin.parent)  # the generated .deepspeed_env lands in the test's tmp_path
        base.update(extra)
        return base


