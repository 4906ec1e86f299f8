"""The installed packages: hfrl and hfrl_kernels import, with and without triton."""
import subprocess
import sys

BLOCK_TRITON = "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_core_imports_without_triton():
    out = run_python(BLOCK_TRITON + (
        "import hfrl, hfrl.cli, hfrl.controller, hfrl.models, hfrl.distributed.tensor_parallel\n"
        "import hfrl_kernels\n"
        "import torch\n"
        "assert not hfrl_kernels.triton_available()\n"
        "assert not hfrl_kernels.use_triton(torch.zeros(1))\n"
        "print('ok')\n"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_kernels_package_is_not_named_kernels():
    # `kernels` is a PyPI package that transformers probes for: hfrl installs its kernels as
    # hfrl_kernels, and transformers must not take the repository's kernels/ folder for it, even
    # when run from the repository root (where that folder is on sys.path).
    out = run_python("import importlib.metadata as md\n"
                     "from transformers.utils import import_utils\n"
                     "top = md.distribution('hfrl').read_text('top_level.txt').split()\n"
                     "probe = getattr(import_utils, 'is_kernels_available', lambda: False)()\n"
                     "print(sorted(top), probe)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['hfrl', 'hfrl_kernels'] False"


def test_console_script_entry_point():
    out = subprocess.run(["hfrl", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "layout" in out.stdout


def test_config_and_cli_import_without_torch():
    # Every `hfrl` process loads the config schema: without torch (about 2.5 s of each process)
    # `hfrl config --describe` and a config error answer in a fraction of a second.
    out = run_python("import sys\n"
                     "import hfrl.config, hfrl.cli, hfrl.engine.config\n"
                     "print('torch' in sys.modules)\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing hfrl.config or hfrl.cli loads torch again"


def test_torch_free_engine_config_matches_the_engine():
    # hfrl.engine.config restates the pipeline schedules (their module imports torch) and names the
    # dtypes; the engine and its re-exports must agree with it.
    from hfrl.distributed.pipeline_parallel import SCHEDULES
    from hfrl.engine import EngineConfig, OptimConfig, config, optim, train_engine

    assert config.PP_SCHEDULES == SCHEDULES
    assert list(train_engine.DTYPES) == list(config.DTYPE_NAMES)
    assert optim.SCHEDULES == config.LR_SCHEDULES
    assert train_engine.EngineConfig is EngineConfig is config.EngineConfig
    assert optim.OptimConfig is OptimConfig is config.OptimConfig
