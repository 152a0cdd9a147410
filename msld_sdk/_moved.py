"""Old module paths from before the packages-by-purpose layout keep working, with a warning.

``import msld_sdk.metrics`` or ``python -m msld_export.train`` find the module at its new place
(``msld_sdk.evaluation.metrics``, ``msld_export.training.train``) and emit a DeprecationWarning
naming it. The table is in ``docs/layout.md``; these aliases go in a later release.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings

MOVED = {
    "msld_sdk.trt_compat": "msld_sdk.backends.trt_compat",
    "msld_sdk.volume": "msld_sdk.clinical.volume",
    "msld_sdk.dicom_seg": "msld_sdk.clinical.dicom_seg",
    "msld_sdk.batch_ray": "msld_sdk.clinical.batch_ray",
    "msld_sdk.datasets": "msld_sdk.evaluation.datasets",
    "msld_sdk.metrics": "msld_sdk.evaluation.metrics",
    "msld_sdk.evaluate": "msld_sdk.evaluation.evaluate",
    "msld_sdk.bench": "msld_sdk.tools.bench",
    "msld_sdk.flops": "msld_sdk.tools.flops",
    "msld_sdk.engine_build": "msld_sdk.tools.engine_build",
    "msld_sdk.cpu_features": "msld_sdk.tools.cpu_features",
    "msld_sdk.cli_clinical": "msld_sdk.cli.clinical",
    "msld_export.config": "msld_export.model.config",
    "msld_export.checkpoint": "msld_export.model.checkpoint",
    "msld_export.train": "msld_export.training.train",
    "msld_export.data": "msld_export.training.data",
    "msld_export.training_input": "msld_export.training.training_input",
    "msld_export.dice_vs_steps": "msld_export.training.dice_vs_steps",
    "msld_export.export_plan": "msld_export.plan_writing.export_plan",
    "msld_export.onnx_passes": "msld_export.plan_writing.onnx_passes",
    "msld_export.quantize_int8": "msld_export.plan_writing.quantize_int8",
    "msld_export.set_defaults": "msld_export.plan_writing.set_defaults",
    "msld_export.gpu_sampler": "msld_export.sampling.gpu_sampler",
    "msld_export.batched_sampler": "msld_export.sampling.batched_sampler",
    "msld_export.baselines": "msld_export.sampling.baselines",
}
# msld_export.model was a module and is now the package of the model's modules: its old
# names (MedSegLatDiff, alphas_cumprod, ...) are re-exported by msld_export/model/__init__.py.


class _AliasSpec(importlib.machinery.ModuleSpec):
    """The old name's spec; ``parent`` is the new module's package, so that ``python -m OLD``
    (runpy) resolves the module's relative imports where it now lives."""

    def __init__(self, name, loader, new):
        real = importlib.util.find_spec(new)
        super().__init__(name, loader, origin=real.origin if real else None)
        self._new_parent = new.rpartition(".")[0]

    @property
    def parent(self):
        return self._new_parent


class _AliasLoader(importlib.abc.Loader):
    """Import: the new module object under the old name. ``python -m``: the new module's code."""

    def __init__(self, new):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new)

    def exec_module(self, module):
        pass

    def get_code(self, fullname):
        spec = importlib.util.find_spec(self.new)
        return spec.loader.get_code(self.new)


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds an old module name: the module at its new place, with a DeprecationWarning."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old name will be removed in a later release",
                      DeprecationWarning, stacklevel=2)
        return _AliasSpec(fullname, _AliasLoader(new), new)


def install() -> None:
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
