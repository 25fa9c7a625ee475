import os

import torch
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
