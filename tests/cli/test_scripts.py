"""`python scripts/train.py ...` (seed 004's spelling) is `nexus train ...`, and runs from an uninstalled checkout."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train.py"

# Runs the script as `python scripts/train.py` would, with the editable install's import hook (and
# PYTHONPATH) removed, so `nexus` can only come from the repository root the script puts on sys.path.
UNINSTALLED = """
import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _bare_env():
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _run(*args, uninstalled=False, cwd):
    if uninstalled:
        cmd, env = [sys.executable, "-c", UNINSTALLED, str(SCRIPT), *args], _bare_env()
    else:
        cmd, env = [sys.executable, str(SCRIPT), *args], None
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


def test_help_lists_the_train_flags(tmp_path):
    out = _run("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--resume", "--use_wandb", "--device", "--max-steps"):
        assert flag in out.stdout, flag


def test_seed_flags_reach_nexus_train_and_a_bad_config_is_one_line(tmp_path):
    # --resume and --use_wandb parse (no usage error); the missing config is then reported in one line
    out = _run("--config", "nope.yaml", "--resume", "checkpoints/checkpoint_step_5000.pt", "--use_wandb",
               cwd=tmp_path)
    assert (out.returncode, out.stderr) == (2, "error: nope.yaml: config file does not exist\n")
    out = _run("--config", str(tmp_path), cwd=tmp_path)
    assert (out.returncode, out.stderr) == (2, f"error: {tmp_path} is a directory, not a config file: "
                                               f"pass a YAML run file\n")


def test_runs_from_a_checkout_without_installing(tmp_path):
    out = _run("--config", "nope.yaml", uninstalled=True, cwd=tmp_path)
    assert (out.returncode, out.stderr) == (2, "error: nope.yaml: config file does not exist\n")
    probe_code = UNINSTALLED.replace('runpy.run_path(sys.argv[0], run_name="__main__")', "import nexus")
    probe = subprocess.run([sys.executable, "-c", probe_code],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_bare_env())
    assert probe.returncode != 0 and "No module named 'nexus'" in probe.stderr  # the hook really is gone
