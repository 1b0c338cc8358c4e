"""What every script shares: one-line errors for bad input, Ctrl-C, atomic writes, the dtype
names, peak memory, and run configs as dataclasses turned into argparse flags.

A script wraps its main in `run(main, ...)`: a ValueError / FileNotFoundError / PermissionError
(how this project reports bad input) prints as one line `error: ...` and exits 2; Ctrl-C exits
130. Set APIQ_DEBUG=1 to see the full traceback instead. Every result file is written with
`atomic_write` (temp file + rename), so a crash never leaves a half-written file that looks
complete.

    python -c "import cli; cli.atomic_write('/tmp/x.txt', 'hello')"
"""
import argparse
import json
import os
import resource
import sys
import tempfile
from dataclasses import field, fields
from pathlib import Path

import torch

# bad input, and a calibration whose loss diverged twice: a clear line, not a traceback
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, FloatingPointError)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"     # every script's --device default


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


def run(main, *args):
    try:
        return main(*args)
    except USER_ERRORS as e:
        if os.environ.get("APIQ_DEBUG"):
            raise
        sys.stderr.write(f"error: {e}\n")      # one write: torchrun's ranks share the stream
        sys.stderr.flush()
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


# ---- files

def atomic_write(path, data):
    """Write `data` to `path` through a temp file in the same directory and os.replace.
    data: str, bytes, or a function that writes the file whose path it is given (e.g.
    `lambda tmp: safetensors.torch.save_file(tensors, tmp)`). The file gets the usual
    permissions (umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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

