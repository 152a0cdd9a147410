"""msld_export: the torch side of msld_sdk (model, training, export to plans), the repository's
export/ folder installed under this name. Needs the [export] extra: pip install 'msld_sdk[export]'."""
import importlib.util as _util

if _util.find_spec("torch") is None:
    raise ImportError("msld_export needs the [export] extra: pip install 'msld_sdk[export]'")
