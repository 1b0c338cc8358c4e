"""What every script's __main__ shares: one-line errors for bad input, Ctrl-C, atomic writes.

A script wraps its main in `run(main)`: a ValueError / FileNotFoundError / PermissionError
(how this project reports bad input) prints as one line `error: ...` and exits 2; Ctrl-C exits
130. Set APIQ_DEBUG=1 to see the full traceback instead. Results are written with
`atomic_write` (temp file + rename), so a crash never leaves a half-written file that looks
complete.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

# bad input, and a calibration whose loss diverged twice: a clear line, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)


def run(main, *args):
    try:
        return main(*args)
    except USER_ERRORS as e:
        if os.environ.get("APIQ_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


def atomic_write(path, data, mode="w"):
    """Write `data` (str or bytes) to path via a temp file in the same directory + os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj):
    atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def check_writable(directory):
    """Fail before hours of work, not after: the output directory must be creatable and writable."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=d, prefix=".probe.")
        probe.close()
    except OSError as e:
        raise PermissionError(f"cannot write to {d}: {e.strerror or e}") from None
