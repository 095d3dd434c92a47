"""Runs untrusted Python (a policy's code plus its tests) in a limited subprocess, for code rewards (spec §8).

The child is a fresh interpreter (`python -I -B`) in its own session, working in a new temporary
folder. Its bootstrap sets resource limits (address space, CPU seconds, file size, open files
and, when not running as root, processes: RLIMIT_NPROC) and installs a `sys.addaudithook` hook
before the code runs (no preexec_fn, which is unsafe in a threaded parent such as JAX). The
hook ends the child at once (`os._exit`, which user code cannot catch) on:
  - socket creation, connect, bind or name lookup (no network);
  - opening a file for writing, or removing/renaming/creating files or folders, outside the folder;
  - fork, exec, spawn, subprocess, os.system (no new processes, so no fork bomb);
  - loading native code through ctypes.
The parent kills the whole process group after a wall-clock timeout, and always on return.

Limitations (honest): audit hooks are not a security boundary. Native extension modules already
importable by the interpreter can act without raising audit events, and there is no network or
filesystem namespace (no unshare, no seccomp). As root, Linux does not enforce RLIMIT_NPROC, so a
fork bomb is stopped only by the hook and the process-group kill. Use it for grading model
output offline, not for hostile code on a shared machine.
"""

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time

BLOCKED_EXIT = 86  # the hook's exit status: a forbidden operation
MEMORY_EXIT = 87   # the bootstrap's exit status: MemoryError

# The child's bootstrap: argv = [sandbox folder, code file]. Everything the hook uses is bound
# at install time, so the code it guards cannot patch it.
_BOOTSTRAP = r'''
import os, resource, sys
def _limit(cpu_s, memory_mb, max_procs, file_mb):
    for name, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
                        (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_NOFILE, 64),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, max_procs)):
        resource.setrlimit(name, (value, value))
def _install(root, _real=os.path.realpath, _join=os.path.join, _write=os.write, _exit=os._exit,
             _wflags=os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC):
    root = _real(root)
    never = ("socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
             "socket.sendto", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
             "subprocess.Popen", "os.startfile", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata")
    path_events = ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
                   "os.chown", "os.truncate", "os.utime", "os.chdir", "shutil.rmtree", "shutil.copyfile", "shutil.move")
    def inside(path):
        if isinstance(path, int):
            return True
        try:
            p = _real(_join(root, os.fsdecode(path)))
        except Exception:
            return False
        return p == root or p.startswith(root + "/")
    def deny(event, args):
        _write(2, ("\nSANDBOX BLOCKED: %s %r\n" % (event, args))[:500].encode())
        _exit(BLOCKED_EXIT)
    def hook(event, args):
        if event in never:
            deny(event, args)
        elif event == "open" and len(args) >= 3:
            mode, flags = args[1] or "", args[2] or 0
            writes = any(c in str(mode) for c in "wax+") or (flags & _wflags)
            if writes and not inside(args[0]):
                deny(event, args)
        elif event in path_events and args and not all(inside(a) for a in args[:2] if isinstance(a, (str, bytes))):
            deny(event, args)
    sys.addaudithook(hook)
root, code_path = sys.argv[1], sys.argv[2]
with open(code_path) as f:
    source = f.read()
_limit(*map(int, sys.argv[3:7]))
_install(root)
del _install, _limit
try:
    exec(compile(source, code_path, "exec"), {"__name__": "__main__"})
except MemoryError:
    os.write(2, b"\nSANDBOX MEMORY: MemoryError\n")
    os._exit(MEMORY_EXIT)
'''.replace("BLOCKED_EXIT", str(BLOCKED_EXIT)).replace("MEMORY_EXIT", str(MEMORY_EXIT))


@dataclasses.dataclass
class SandboxResult:
    status: str        # "ok", "error" (exception / failed test), "timeout", "memory", "blocked", "crashed"
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, *, timeout_s: float = 5.0, memory_mb: int = 512, max_procs: int = 16,
               file_mb: int = 16, max_output: int = 10_000) -> SandboxResult:
    """Runs `code` as a script in the sandbox and says how it ended (never raises for the code's
    misbehaviour): "ok" exit 0; "error" any other exit (an exception, a failed assert);
    "timeout" past timeout_s (wall) or the CPU limit; "memory" past memory_mb; "blocked" a
    forbidden operation; "crashed" killed by another signal."""
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s and memory_mb: expected > 0, got {timeout_s}, {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="sandbox_") as root:
        code_path, boot_path = os.path.join(root, "main.py"), os.path.join(root, "_bootstrap.py")
        with open(code_path, "w") as f:
            f.write(code)
        with open(boot_path, "w") as f:
            f.write(_BOOTSTRAP)
        env = {"PATH": "/usr/bin:/bin", "HOME": root, "TMPDIR": root, "PYTHONDONTWRITEBYTECODE": "1"}
        start = time.monotonic()
        limits = [max(1, int(timeout_s) + 1), memory_mb, max_procs, file_mb]
        proc = subprocess.Popen([sys.executable, "-I", "-B", boot_path, root, code_path, *map(str, limits)], cwd=root,
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            out, err = proc.communicate()
        finally:
            _kill_group(proc)
        seconds = time.monotonic() - start
    rc = proc.returncode
    stdout, stderr = out.decode(errors="replace")[-max_output:], err.decode(errors="replace")[-max_output:]
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"
    elif rc == BLOCKED_EXIT and "SANDBOX BLOCKED" in stderr:
        status = "blocked"
    elif rc == MEMORY_EXIT or "MemoryError" in stderr:
        status = "memory"
    elif rc == 0:
        status = "ok"
    elif rc < 0:
        status = "crashed"
    else:
        status = "error"
    return SandboxResult(status, rc, stdout, stderr, seconds)
