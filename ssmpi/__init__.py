"""ssmpi: depth-parallel video training with Sideways and Skip-Sideways over MPI.

Layout (``docs/DESIGN.md`` has the picture):

- ``ssmpi.nn``: hand-written ops (forward/VJP pairs), layers and models;
- ``ssmpi.engine``: the paper's Section 4: units and edges, messages, the unit step, the
  executors, the transport (MPI point-to-point), the gradient reducer, the plan, BPTT;
- ``ssmpi.baselines``: exact backprop, causal 3D CNN, GPipe;
- the programs, ``python -m ssmpi.<name>``: ``train``, ``evaluate``, ``plan``, ``plot``,
  ``perfmodel``; and what they share: ``config``, ``data``, ``checkpoint``, ``trace``,
  ``backend``, ``failure``, ``optim``.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Import paths of earlier versions keep working (scripts and notebooks written against them):
# ``import ssmpi.sideways`` is ``ssmpi.engine.executor``, the very same module object.
_MOVED = {
    "ssmpi.ops": "ssmpi.nn.ops", "ssmpi.layers": "ssmpi.nn.layers",
    "ssmpi.models": "ssmpi.nn.models", "ssmpi.topology": "ssmpi.engine.topology",
    "ssmpi.unit": "ssmpi.engine.unit", "ssmpi.exchange": "ssmpi.engine.transport",
    "ssmpi.sideways": "ssmpi.engine.executor", "ssmpi.bptt": "ssmpi.engine.bptt",
}


def _new_name(name: str):
    for old, new in _MOVED.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    return None


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if _new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(_new_name(spec.name))
        spec.loader_state = module.__spec__  # the import machinery overwrites __spec__
        return module

    def exec_module(self, module):
        module.__spec__ = module.__spec__.loader_state  # keep the module's own spec


sys.meta_path.insert(0, _MovedModules())
