"""Probe snippets shared by doctor, provision and transfer: the python probe and free disk space from `df`."""

from __future__ import annotations

from pistill.formats import FORMATS

# every format's runtime package, and those doctor reports beside them
PROBED = tuple(sorted({f.distribution for f in FORMATS.values()} | {"numpy", "tokenizers", "transformers"}))
# python -c: {version, executable, bits, packages, llama_system_info} of the python that runs it, as one JSON line
PY_PROBE = ("import json,platform,struct,sys\nfrom importlib import metadata\nv={}\n"
            f"for n in {PROBED!r}:\n"
            "    try: v[n]=metadata.version(n)\n    except Exception: v[n]=None\n"
            "try:\n    import llama_cpp; si=llama_cpp.llama_print_system_info().decode(errors='replace').strip()\n"
            "except Exception: si=None\n"
            "print(json.dumps({'version':platform.python_version(),'executable':sys.executable,"
            "'bits':struct.calcsize('P')*8,'packages':v,'llama_system_info':si}))")
# sh: `df -Pk` of the file system holding $1 (or its nearest existing parent: the cache may not exist yet)
DF = 'd=$1; while [ ! -d "$d" ]; do d=$(dirname "$d"); done; df -Pk "$d"'


def parse_df(text: str) -> int | None:
    """Available bytes from `df -Pk` output (POSIX format: the 4th column of the 2nd line, in KiB)."""
    lines = text.strip().splitlines()
    try:
        return int(lines[1].split()[3]) * 1024
    except (IndexError, ValueError):
        return None
