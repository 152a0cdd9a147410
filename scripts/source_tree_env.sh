# Sourced (from the repository root) by the device scripts, which run on a copy of the
# repository without installing it: msld_sdk lives at the root, msld_export under export/.
export PYTHONPATH="$PWD:$PWD/export${PYTHONPATH:+:$PYTHONPATH}"
