"""msld_export: the torch side of msld_sdk: the model (``model``), training (``training``), plan
writing (``plan_writing``), reference import (``reference``) and the torch samplers
(``sampling``). Needs the [export] extra: pip install 'msld_sdk[export]'."""
import importlib.util as _util

if _util.find_spec("torch") is None:
    raise ImportError("msld_export needs the [export] extra: pip install 'msld_sdk[export]'")

import msld_sdk  # noqa: E402,F401  (installs the finder of old module paths, msld_sdk._moved)
