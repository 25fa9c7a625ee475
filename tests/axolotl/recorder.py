"""A test harness plugin for ``axolotl train`` (listed after memops' plugin in the test's YAML): records each
rank's logged losses and how many times ``memops.linear_cross_entropy`` ran, and holds the harness's CPU
workaround.

CPU workaround (Axolotl 0.19): with more than one process ``normalize_config`` sets
``device_map = {"": LOCAL_RANK}``, a CUDA device index, and the model loader passes it to ``from_pretrained``
before any plugin hook runs; here the loader's device-map step is wrapped (when this module is imported, as
the plugin is registered) so that each rank's model is loaded on the CPU.
"""

from __future__ import annotations

import json
import os

import torch
from axolotl.integrations.base import BasePlugin
from axolotl.loaders.model import ModelLoader
from transformers import TrainerCallback

CALLS = {"memops": 0}


class _Record(TrainerCallback):
    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, args, state, control, **kwargs):
        losses = [row["loss"] for row in state.log_history if "loss" in row]
        rank = int(os.environ.get("RANK", "0"))
        with open(f"{self.path}.rank{rank}.json", "w") as f:
            json.dump({"losses": losses, "memops_calls": CALLS["memops"]}, f)


_device_map = ModelLoader._set_device_map_config


def _on_cpu(self):  # the CPU workaround above
    _device_map(self)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        self.model_kwargs["device_map"] = {"": "cpu"}


ModelLoader._set_device_map_config = _on_cpu


class RecorderPlugin(BasePlugin):
    def pre_model_load(self, cfg):
        import memops

        inner = memops.linear_cross_entropy

        def counted(*args, **kwargs):
            CALLS["memops"] += 1
            return inner(*args, **kwargs)

        memops.linear_cross_entropy = counted  # the transformers integration looks it up at each call

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [_Record(os.environ["MEMOPS_AXOLOTL_RECORD"])]
