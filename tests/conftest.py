import os
import tempfile

# inductor's on-disk cache does not tell kernel sets apart: code cached by a native (avx512) run was reused
# under ATEN_CPU_CAPABILITY=default and failed to build ("'at::vec' has not been declared").  A run under a
# chosen capability gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR",
        os.path.join(tempfile.gettempdir(), f"torchinductor_memops_{os.environ['ATEN_CPU_CAPABILITY']}"),
    )

import torch  # noqa: E402

# the Triton heads run on CPU tensors under the Triton interpreter (tests/test_triton.py); it is chosen when
# the kernels are built, so here, before any test imports them.  With a GPU they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import settings

settings.register_profile(
    "default",
    deadline=None,
    max_examples=int(os.environ.get("MEMOPS_EXAMPLES", "40")),
    derandomize=bool(os.environ.get("CI")),
    print_blob=True,
)
settings.load_profile("default")
torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))

import pytest  # noqa: E402

# Axolotl pins its own TRL and transformers, torchtitan needs datasets<4.8, verl its own transformers: their tests
# run in venvs of their own (.ci/run's framework steps: python -m pytest --confcutdir tests/NAME tests/NAME), never
# in this one
collect_ignore = ["axolotl", "torchtitan", "verl"]


@pytest.fixture
def plan_small_calls(monkeypatch):
    """Row planning at every size: the tests of which rows a call skips use small shapes, which by default
    compute every row (``memops.ops.plan.PLAN_MIN_MACS``)."""
    from memops.ops import plan

    monkeypatch.setattr(plan, "PLAN_MIN_MACS", 0)


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """A one-process gloo group (the default group) for the tests of the vocab-parallel op, unless one exists."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
