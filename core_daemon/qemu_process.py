"""Starting QEMU as the core's own child, and learning when it exits, without threads.

QEMU runs in its own session (so a Ctrl-C meant for the core does not kill the guest behind the core's back),
with stdout/stderr in ``qemu.log`` (so the guest survives a core that dies: no pipe to break), never with
``-daemonize`` (a daemonized QEMU is reparented and never reaped by us). Exit is observed through a pidfd
registered with the event loop, which works for children and, in attach mode, for a QEMU we did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shm.naming import pid_alive

log = logging.getLogger(__name__)

_KVM_GET_API_VERSION = 0xAE00
_KVM_CREATE_VM = 0xAE01
_KVM_API_VERSION = 12

#: QEMU options (without dashes: QEMU takes -opt and --opt alike) that choose an accelerator or a display;
#: if the user gave one, the core adds none of its own.
_ACCEL_OPTIONS = frozenset({"accel", "enable-kvm", "no-kvm"})
_DISPLAY_OPTIONS = frozenset({"display", "nographic"})
#: Options that would expose a monitor or display outside the core; allowed, but logged.
_PUBLIC_OPTIONS = frozenset({"vnc", "spice", "monitor", "qmp", "qmp-pretty", "mon", "serial", "gdb", "s"})


class QemuStartError(Exception):
    """QEMU could not be started or exited before it was ready; the message includes its stderr."""


def kvm_usable(device: str = "/dev/kvm") -> tuple[bool, str]:
    """Probe KVM for real (open, API version, create a VM): a present but unusable /dev/kvm is common nested."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{device}: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
        if version != _KVM_API_VERSION:
            return False, f"{device}: KVM API version {version}, expected {_KVM_API_VERSION}"
        vm_fd = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm_fd)
    except OSError as exc:
        return False, f"{device}: cannot create a VM: {exc.strerror}"
    finally:
        os.close(fd)
    return True, "ok"


def choose_accel(requested: str | None) -> str:
    """``kvm`` when it works, else ``tcg``; an explicit request wins."""
    if requested:
        return requested
    usable, why = kvm_usable()
    if usable:
        return "kvm"
    # A host without /dev/kvm runs TCG by design; one whose /dev/kvm does not work probably needs fixing.
    level = logging.WARNING if os.path.exists("/dev/kvm") else logging.INFO
    log.log(level, "KVM not usable (%s); using TCG software emulation (much slower)", why)
    return "tcg"


def _options_in(args: list[str], names: frozenset[str]) -> list[str]:
    return [arg for arg in args if arg.startswith("-") and arg.lstrip("-") in names]


def _machine_sets_accel(args: list[str]) -> bool:
    return any(flag in ("-machine", "-M") and "accel=" in value for flag, value in itertools.pairwise(args))


@dataclass(frozen=True)
class QemuCommand:
    """The full QEMU command line the core runs, built from the user's arguments plus the core's own."""

    argv: list[str]
    accel: str | None  # None when the user chose the accelerator in their own arguments


def qemu_opt_value(text: str | Path) -> str:
    """Escape a value for QEMU's option syntax, where ``,`` separates options and ``,,`` is a literal comma."""
    return str(text).replace(",", ",,")


def build_qemu_command(
    binary: str,
    vm_name: str,
    user_args: list[str],
    qmp_socket: Path,
    accel: str | None,
    vnc_socket: Path | None = None,
    agent_socket: Path | None = None,
    serial_socket: Path | None = None,
    clipboard: bool = False,
) -> QemuCommand:
    """Add what the core needs: ``-nodefaults``, the private QMP (and VNC) socket, no other display, an accelerator."""
    args: list[str] = [binary, "-nodefaults"]
    if "-name" not in user_args:
        args += ["-name", vm_name]
    chosen: str | None = None
    if not (_options_in(user_args, _ACCEL_OPTIONS) or _machine_sets_accel(user_args)):
        chosen = choose_accel(accel)
        args += ["-accel", chosen]
    if not _options_in(user_args, _DISPLAY_OPTIONS):
        # Without this QEMU falls back to a VNC server on localhost:5900 when no GUI is available.
        args += ["-display", "none"]
    args += ["-chardev", qmp_chardev_option(qmp_socket), "-mon", "chardev=vmfront-qmp,mode=control"]
    if vnc_socket is not None:
        # The display capture's source: QEMU's own VNC server, on a socket only the core can reach.
        args += ["-vnc", f"unix:{qemu_opt_value(vnc_socket)}"]
    ports: list[str] = []
    if agent_socket is not None:
        # The guest agent's virtio-serial port, its host side on a socket only the core can reach.
        args += ["-chardev", f"socket,id=vmfront-qga,path={qemu_opt_value(agent_socket)},server=on,wait=off"]
        ports.append("virtserialport,bus=vmfront-vserial.0,chardev=vmfront-qga,name=org.qemu.guest_agent.0")
    if clipboard:
        # QEMU's own spice-vdagent peer: the guest's spice-vdagent shares its clipboard with QEMU, whose VNC
        # server (the capture's connection) carries it as the Extended Clipboard. Not its mouse: input stays
        # with the tablet and keyboard the display capture drives.
        args += ["-chardev", "qemu-vdagent,id=vmfront-vdagent,clipboard=on,mouse=off"]
        ports.append("virtserialport,bus=vmfront-vserial.0,chardev=vmfront-vdagent,name=com.redhat.spice.0")
    if ports:
        args += ["-device", "virtio-serial,id=vmfront-vserial"]
        for port in ports:
            args += ["-device", port]
    if serial_socket is not None:
        # The guest's first serial port (ttyS0, COM1), its host side on a socket only the core can reach.
        args += ["-chardev", f"socket,id=vmfront-serial,path={qemu_opt_value(serial_socket)},server=on,wait=off",
                 "-serial", "chardev:vmfront-serial"]
    public = _options_in(user_args, _PUBLIC_OPTIONS)
    if public:
        log.warning("QEMU arguments open their own endpoints outside the core: %s", " ".join(public))
    return QemuCommand(args + user_args, chosen)


class ProcessWatch:
    """Completes when a process exits, via a pidfd on the event loop (no thread, no polling)."""

    def __init__(self, pid: int, *, child: bool) -> None:
        self.pid = pid
        self.child = child
        self.returncode: int | None = None
        self._exited = asyncio.get_running_loop().create_future()
        self._fd: int | None = None
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._set_exit(None)
            return
        asyncio.get_running_loop().add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        code: int | None = None
        if self.child:
            try:
                _, status = os.waitpid(self.pid, os.WNOHANG)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = None
        self._set_exit(code)

    def _set_exit(self, code: int | None) -> None:
        if self._fd is not None:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None
        self.returncode = code
        if not self._exited.done():
            self._exited.set_result(code)

    @property
    def exited(self) -> bool:
        return self._exited.done()

    async def wait(self) -> int | None:
        """The exit status as ``subprocess`` reports it (negative for a signal); None if unknown."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: signal.Signals) -> None:
        if self.exited:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)


def spawn(argv: list[str], *, output_fd: int | None = None, new_session: bool = False) -> int:
    """Start a child without a thread or a Popen object (the pidfd watch reaps it); returns its pid.

    Every fd Python opens is close-on-exec, so the child inherits only stdio and what was made inheritable.
    ``output_fd`` replaces stdout and stderr; stdin is /dev/null when a new session is asked for.
    """
    actions: list[tuple[Any, ...]] = []
    if new_session:
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
    if output_fd is not None:
        actions += [(os.POSIX_SPAWN_DUP2, output_fd, 1), (os.POSIX_SPAWN_DUP2, output_fd, 2)]
    return os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions, setsid=new_session)


def spawn_qemu(command: QemuCommand, log_path: Path) -> int:
    """Start QEMU in its own session with its output in ``log_path``. A missing binary is a clear error."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        return spawn(command.argv, output_fd=log_fd, new_session=True)
    except FileNotFoundError as exc:
        raise QemuStartError(f"QEMU binary not found: {command.argv[0]} ({exc.strerror})") from exc
    except PermissionError as exc:
        raise QemuStartError(f"cannot execute QEMU binary {command.argv[0]}: {exc.strerror}") from exc
    finally:
        os.close(log_fd)


def log_tail(path: Path, limit: int = 4000) -> str:
    """The last bytes QEMU wrote, for error messages."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (status unknown: not our child)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


def process_start_ticks(pid: int) -> int | None:
    """When a process started (clock ticks since boot, /proc/PID/stat field 22): with the pid, an identity that
    a reused pid cannot fake. None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain anything: fields after the last ')' are fixed.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [arg.decode(errors="surrogateescape") for arg in raw.split(b"\0")[:-1]]


def qmp_chardev_option(qmp_socket: Path) -> str:
    """The ``-chardev`` value that gives QEMU the core's private monitor socket: also how the core recognises the
    QEMU of its VM among all processes (no other process names that socket in its arguments)."""
    return f"socket,id=vmfront-qmp,path={qemu_opt_value(qmp_socket)},server=on,wait=off"


@dataclass(frozen=True)
class QemuIdentity:
    """A running QEMU, identified by pid and start time (so a reused pid is never mistaken for it)."""

    pid: int
    start_time: int

    def still_alive(self) -> bool:
        return process_start_ticks(self.pid) == self.start_time


def find_vm_qemu(qmp_socket: Path, hint: int | None = None) -> QemuIdentity | None:
    """The live QEMU whose arguments name this VM's private monitor socket, whatever state.json says.

    ``hint`` (the pid state.json last recorded) is checked first; otherwise every process is looked at, so a QEMU
    is found even when state.json is missing, stale or wrong: a core must never start a second QEMU beside it.
    """
    option = qmp_chardev_option(qmp_socket)
    candidates: list[int] = [hint] if hint else []
    candidates += [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and int(entry) != hint]
    for pid in candidates:
        start = process_start_ticks(pid)
        argv = process_argv(pid) if start is not None else None
        if argv and option in argv and pid != os.getpid():
            if not pid_alive(pid):  # a zombie: gone, not yet reaped
                continue
            # Read the start time again: the pid must not have been reused while we read its arguments.
            if process_start_ticks(pid) == start:
                assert start is not None
                return QemuIdentity(pid, start)
    return None
