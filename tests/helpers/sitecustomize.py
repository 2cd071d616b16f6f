"""Imported at start-up by every Python process when tests/helpers is on PYTHONPATH.

With BULK2SC_AUDIT_ROOT set, an audit hook records each file this process opens for writing
(or renames) under that folder, one line per path, in BULK2SC_AUDIT_DIR/rank<RANK>.txt. The
distributed tests read those lists to check that only rank 0 wrote outputs.
"""
import os
import sys

_root = os.environ.get("BULK2SC_AUDIT_ROOT")
if _root:
    _log_path = os.path.join(os.environ["BULK2SC_AUDIT_DIR"], f"rank{os.environ.get('RANK', 'launcher')}.txt")
    _log = open(_log_path, "a", buffering=1)
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def _record(event, args):
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, os.PathLike)):
                return
            path = os.fspath(path)
            wants_write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _writing)
            if wants_write and path.startswith(_root):
                _log.write(path + "\n")
        elif event == "os.rename":
            if os.fspath(args[1]).startswith(_root):
                _log.write(os.fspath(args[1]) + "\n")

    sys.addaudithook(_record)
