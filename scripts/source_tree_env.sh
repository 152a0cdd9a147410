# Sourced (from the repository root) by the device scripts, which run on a copy of the
# repository without installing it: puts msld_sdk (the root) and msld_export (the export/
# folder under its package name, as an install maps it) on PYTHONPATH, the latter through a
# link in a temporary folder.
MSLD_ALIAS_DIR="$(mktemp -d)"
ln -s "$PWD/export" "$MSLD_ALIAS_DIR/msld_export"
export PYTHONPATH="$PWD:$MSLD_ALIAS_DIR${PYTHONPATH:+:$PYTHONPATH}"
