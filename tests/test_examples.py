"""The README's "Use from your own JAX code" example runs, on 8 devices, as printed there."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "own_pmap_step.py")


def test_readme_shows_the_example_file():
  readme = open(os.path.join(REPO, "README.md")).read()
  section = readme.split("## Use from your own JAX code", 1)[1]
  shown = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert shown == open(EXAMPLE).read()


def test_example_runs_on_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  losses = re.findall(r"step \d: loss (\S+)", out.stdout)
  assert len(losses) == 3 and all(float(x) > 0 for x in losses)
  assert "kNN predictions:" in out.stdout
