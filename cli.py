"""What every script shares: one-line errors for bad input, Ctrl-C, atomic writes, the dtype
names, peak memory, and run configs as dataclasses turned into argparse flags.

A script wraps its main in `run(main, ..., resume=...)`: a ValueError / FileNotFoundError /
NotADirectoryError / PermissionError (how this project reports bad input) or a FloatingPointError (a
calibration whose loss diverged twice) prints as one line `error: ...` and exits 2;
a full disk prints one line naming the file and exits 1; Ctrl-C exits 130 and SIGTERM (what SLURM
and Kubernetes send before they kill) 143 (128 + 15), each with one line saying how the same
command continues (`resume`). Set APIQ_DEBUG=1 to see the full traceback of an error instead. Every result
file is written with `atomic_write` (temp file + rename), so a crash, a signal or a full disk never
leaves a half-written file that looks complete.

    python -c "import cli; cli.atomic_write('/tmp/x.txt', 'hello')"
"""
import argparse
import errno
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
from dataclasses import field, fields
from pathlib import Path

import torch
from tqdm import tqdm

# bad input, and a calibration whose loss diverged twice: a clear line, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # every script's --device default


def compute_in(device, dtype):
    """Where the matmuls run at `dtype` (--dtype): autocast on `device`'s type for bf16 / fp16, CUDA and
    CPU alike; a disabled context in fp32. The block-wise pass and the end-to-end stage both enter it."""
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)


def default_dtype(device) -> str:
    """--dtype when it is not given, the one place the scripts' default is set: it follows --device,
    bf16 on a GPU, fp32 on the CPU (`--device cpu` on a machine with a GPU is fp32, like the same
    command on a machine without one). Each script's Config calls it in __post_init__."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def check_device(device, dtype=None):
    """One line instead of a CUDA traceback: no GPU, a GPU index that is not there, bf16 on a GPU
    without it (T4, V100: emulated and slow)."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA GPU here (use --device cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
    if dtype == torch.bfloat16 and not torch.version.hip and torch.cuda.get_device_capability(device) < (8, 0):
        raise ValueError(f"--dtype bf16: {torch.cuda.get_device_name(device)} has no native bf16 (before Ampere): "
                         f"give --dtype fp32")


class Terminated(BaseException):
    """SIGTERM arrived: raised where the program is, like KeyboardInterrupt for Ctrl-C (atomic writes
    make every point safe to stop at), and not an Exception, so nothing catches it on the way."""


def _terminate(signum, frame):
    raise Terminated()


class DiskFull(Exception):
    """A write failed because the filesystem is full (or the quota is used up); atomic: the write
    went through atomic_write, so nothing of it was left (else the file may be incomplete)."""

    def __init__(self, path, cause, atomic=True):
        super().__init__(f"the disk is full: could not write {path} ({cause})")
        self.path, self.atomic = path, atomic


def out_of_space(e, directory=None) -> bool:
    """Whether exception `e`, raised while writing into `directory`, means the disk is full. The
    errors arrive as OSError (errno ENOSPC / EDQUOT), safetensors' SafetensorError ("No space left on
    device (os error 28)"), and torch.save's RuntimeError, which says only "unexpected pos" or "file
    write failed": for that one the filesystem is asked whether it has room left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(w in str(e) for w in ("No space left on device", "os error 28", "Disk quota exceeded")):
        return True
    if isinstance(e, RuntimeError) and directory is not None:
        try:
            return shutil.disk_usage(directory).free < 1 << 20
        except OSError:
            return False
    return False


def run(main, *args, resume="the same command runs it again"):
    """main(*args) with the project's endings: bad input, a full disk, Ctrl-C and SIGTERM each as one
    line on stderr and an exit code. resume: how the same command continues after an interruption
    (e.g. "the same command continues from the last finished block")."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return main(*args)
    except Exception as e:
        if os.environ.get("APIQ_DEBUG"):
            raise
        if not isinstance(e, DiskFull) and out_of_space(e):              # a write outside atomic_write
            e = DiskFull(getattr(e, "filename", None) or "a file", str(e).splitlines()[0], atomic=False)
        if isinstance(e, DiskFull):
            left = "nothing half-written was left" if e.atomic else "that file may be incomplete: the rerun rewrites it"
            fail(f"error: {e}; {left}: free some space, then {resume}", 1)
        if isinstance(e, USER_ERRORS):
            fail(f"error: {e}", 2)
        raise
    except KeyboardInterrupt:
        fail(f"\ninterrupted (Ctrl-C): {resume}", 130)
    except Terminated:
        fail(f"\nterminated (SIGTERM): {resume}", 143)


def fail(line, code):
    """Close the progress bars (so that the line starts a line of its own), one write (torchrun's ranks
    share the stream), then exit with `code`."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(code)


# ---- files

def atomic_write(path, data):
    """Write `data` to `path` through a temp file in the same directory and os.replace.
    data: str, bytes, or a function that writes the file whose path it is given (e.g.
    `lambda tmp: safetensors.torch.save_file(tensors, tmp)`). The file gets the usual
    permissions (umask), not mkstemp's 0600. Whatever goes wrong, the temp file is removed and
    `path` is the old file or none; a full disk is raised as DiskFull naming `path`."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and out_of_space(e, path.parent if path.parent.exists() else None)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if full:
            raise DiskFull(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
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


# ---- memory

def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: writing 5 resets the resident high-water mark VmHWM
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def rss_gib(peak=False) -> float:
    """Resident host memory now, or its peak over the process's life (peak=True)."""
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**30


def peak_memory_gib(device) -> float:
    """Peak since reset_peak_memory: device memory on CUDA, resident host memory on CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 2**20            # kB
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # lifetime peak, KiB


# ---- run configs: one dataclass per script; its fields are the flags, their defaults the paper's

def arg(default, help, result=True, choices=None, type=None):
    """A config field with its flag's help. result=False: a setting that does not change the
    result (where to write, threads, ...), so a resumed run may differ in it. type: the flag's
    type where the default is None (else the default's type)."""
    return field(default=default, metadata={"help": help, "result": result, "choices": choices,
                                            "type": type or (str if default is None else _type(default))})


def _type(x):
    return x.__class__


def as_flags(preset: dict) -> str:
    """A preset's settings as the flags that give them, for a help text."""
    return " ".join(f"--{k.replace('_', '-')}" if v is True else f"--no-{k.replace('_', '-')}" if v is False
                    else f"--{k.replace('_', '-')} {v}" for k, v in preset.items())


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's one-line errors: `error: argument --bits: invalid int value:
    'x' (see --help)` and exit 2, without the usage block above it."""

    def error(self, message):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_config_args(p: argparse.ArgumentParser, cls, shown_defaults=None):
    """One --flag per field of dataclass `cls`, with its default in the help. A flag that is not
    given is absent from the parsed namespace (argparse.SUPPRESS), so presets can fill it."""
    shown = {f.name: f.default for f in fields(cls)} | (shown_defaults or {})
    for f in fields(cls):
        flag, meta, default = "--" + f.name.replace("_", "-"), f.metadata, shown[f.name]
        # the default once: where the help text already says it (a default that depends on other
        # settings, e.g. "default out/<ckpt>-..."), argparse's None is not added
        help = meta["help"] if "(default" in meta["help"] else f"{meta['help']} (default: {default})"
        if meta["type"] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            p.add_argument(flag, type=meta["type"], choices=meta["choices"], default=argparse.SUPPRESS, help=help)


def parse_config(cls, description, argv=None, build=None):
    """The config dataclass `cls` from the command line: its flags, then build(**given)
    (default cls itself; a preset-aware builder can fill what was not given)."""
    p = ArgumentParser(description=description)
    add_config_args(p, cls)
    return (build or cls)(**vars(p.parse_args(argv)))


def result_settings(config) -> dict:
    """The fields of a config dataclass that change the result."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.metadata.get("result", True)}

