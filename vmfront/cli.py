"""``vmfront``: one program, one subcommand per job (start a core, show status, ...).

Argument parsing and process set-up only; each subcommand's work lives in the package that owns it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipc.rundir import RunDir, RunDirError, check_vm_name, follow_migrations

if TYPE_CHECKING:
    from clients.vnc.tls import TlsSettings

# What `vmfront --help` says, for operators (the module docstring above is for developers).
DESCRIPTION = """\
Run QEMU virtual machines with their VNC server, text monitor, serial console and guest-agent handling in an
unprivileged client process, apart from the privileged per-VM core that supervises QEMU.

Start a VM with `vmfront run --name NAME [-- QEMU_ARGS]`, see them all with `vmfront list`, stop one with
`vmfront stop NAME`. docs/operator.md walks through an operator's day."""

log = logging.getLogger("vmfront")

#: The system user (and group) clients run as when started by root; install.sh creates it, and
#: contrib/systemd/vmfront.sysusers.conf declares it.
CLIENT_USER = "vmfront"
#: Exit status of a daemon subcommand that failed with an unexpected error (sysexits' EX_SOFTWARE): unlike a
#: start-up error (1), starting it again may help, so service managers restart on it.
EXIT_INTERNAL_ERROR = 70


class CliError(Exception):
    """A subcommand cannot do its job; the message is printed as ``vmfront CMD: error: ...``."""


class _OneLineQmpFormatter(logging.Formatter):
    """The qemu.qmp library logs its traffic as indented, multi-line JSON: one line per record keeps logs
    greppable (JSON has no raw newlines inside strings, so joining the lines changes no value)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        if record.name.startswith("qemu.qmp"):
            record.message = re.sub(r"\s*\n\s*", " ", record.message).strip()
        return super().formatMessage(record)


def _setup_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineQmpFormatter("%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbosity else logging.INFO, handlers=[handler])
    if verbosity < 2:
        logging.getLogger("qemu.qmp").setLevel(logging.WARNING)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _add_vm(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    if positional:
        parser.add_argument("name", help="VM name")
    else:
        parser.add_argument("--name", required=True, help="VM name (unique per host)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: /run/vmfront/NAME as root, else "
                        "$XDG_RUNTIME_DIR/vmfront/NAME, else a per-user tmp dir)")


def _subparser(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand that also takes -v after its name (``vmfront core -v`` as well as ``vmfront -v core``)."""
    parser: argparse.ArgumentParser = sub.add_parser(name, **kwargs)
    parser.add_argument("-v", "--verbose", dest="sub_verbose", action="count", default=0,
                        help="more logging (-vv: QMP traffic)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmfront", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: QMP traffic)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _subparser(sub, "run", help="start a VM: its core and its client together",
                     description="Starts `vmfront client` (first: a listener that cannot be bound fails at once), "
                     "then `vmfront core`, as child processes, and supervises them: a client that dies is started "
                     "again, a core that dies while QEMU runs is started again and adopts QEMU. Ctrl-C (or "
                     "`vmfront stop NAME`) stops both. QEMU_ARGS follow `--` (none: the demo guest).")
    _add_vm(run, positional=False)
    run.add_argument("--client-user", metavar="USER",
                     help=f"as root: run the client as this user (default: {CLIENT_USER}, created by install.sh); "
                     "the core opens its client sockets to the user's group")
    run.add_argument("--client-as-root", action="store_true",
                     help="as root: run the client as root (not recommended: it parses what viewers and the guest "
                     "send)")
    run.add_argument("--vnc", default="127.0.0.1:5900", metavar="HOST:PORT|:DISPLAY|unix:PATH",
                     help="where the client serves VNC (default 127.0.0.1:5900; :N is display N, 127.0.0.1:5900+N)")
    run.add_argument("--websocket", metavar="HOST:PORT", help="also serve VNC over WebSocket (noVNC)")
    run.add_argument("--web", default="127.0.0.1:0", metavar="HOST:PORT|none",
                     help="the web console: the VM's screen and noVNC in a browser (default: a free port on "
                     "127.0.0.1; 'none': no web console)")
    run.add_argument("--vnc-password-file", type=Path, metavar="FILE",
                     help="VNC authentication with the first line of FILE (see core --vnc-password-file)")
    run.add_argument("--keymap", metavar="LANG|PATH", help="keysym viewers' keyboard layout (see client --keymap)")
    run.add_argument("--agent", action="store_true", help="give the guest a qemu-ga channel (see core --agent)")
    run.add_argument("--serial", action="store_true",
                     help="give the guest a serial port, reachable with `vmfront console NAME`")
    run.add_argument("--clipboard", action="store_true",
                     help="share the clipboard of VNC viewers and the guest's spice-vdagent (see core --clipboard)")
    run.add_argument("--accel", help="accelerator (default: kvm if usable, else tcg)")
    run.add_argument("--on-core-death", choices=("restart", "stop"), default="restart",
                     help="if the core dies while QEMU runs: start a core that adopts QEMU (default), or stop "
                     "the VM")
    run.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU_ARGS")

    lst = _subparser(sub, "list", help="list the VMs: state, QEMU pid, clients, VNC",
                     description="Every VM with a run directory under the run root (default: /run/vmfront as "
                     "root, else $XDG_RUNTIME_DIR/vmfront).")
    lst.add_argument("--run-root", type=Path, metavar="DIR", help="directory holding the VMs' run directories")
    lst.add_argument("--all", action="store_true", help="also VMs whose core is not running")
    lst.add_argument("--json", action="store_true", help="one JSON array, for scripts")

    stop = _subparser(sub, "stop", help="shut a VM down: ACPI power button, then quit after a deadline",
                      description="Like `virsh shutdown` with a fallback: presses the guest's power button "
                      "(system_powerdown), waits up to --timeout seconds for the guest to power off, then quits "
                      "QEMU. Exit status: 0 the guest powered off, 3 it did not and QEMU was quit, 1 error.")
    _add_vm(stop, positional=True)
    stop.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                      help="how long the guest may take to power off (default 60; 0: quit at once)")
    kill = _subparser(sub, "kill", help="stop a VM now (like virsh destroy): QEMU quits, the guest is not asked",
                      description="Quits QEMU at once through the core (the guest gets no chance to shut down); "
                      "if QEMU does not go, it is killed. Exit status: 0 stopped, 1 error.")
    _add_vm(kill, positional=True)

    status = _subparser(sub, "status", help="show a VM's state")
    _add_vm(status, positional=True)
    status.add_argument("--json", action="store_true", help="print state.json as JSON for scripts")

    monitor = _subparser(sub, "monitor", help="the VM's text monitor, interactively (history, completion)",
                         description="Connects to the client's monitor socket (the one the running client "
                         "reports in state.json, else RUN_DIR/monitor.sock).")
    _add_vm(monitor, positional=True)
    monitor.add_argument("--socket", type=Path, help="monitor socket (default: the client's)")

    console = _subparser(sub, "console", help="the VM's serial console, interactively (Ctrl-] leaves)",
                         description="Attaches the terminal to the guest's serial port (core --serial) through the "
                         "client's console socket: first what the client kept (scrollback), then live. Several "
                         "sessions may watch at once; the first one that types holds the keyboard until it leaves.")
    _add_vm(console, positional=True)
    console.add_argument("--socket", type=Path, help="console socket (default: the client's)")
    console.add_argument("--read-only", action="store_true", help="watch only: never type into the console")

    dump = _subparser(sub, "screendump", help="write the guest's current screen to an image file",
                      description="Reads the shared framebuffer read-only: no QMP call, no path handed to QEMU. "
                      "The format follows FILE's suffix (.png, .jpg, .ppm, .bmp, ...; none: PNG).")
    _add_vm(dump, positional=True)
    dump.add_argument("file", type=Path, help="image file to write")

    agent = _subparser(sub, "agent", help="talk to the guest agent (qemu-ga) through the client's agent proxy",
                       description="COMMAND is a qemu-ga command (e.g. guest-get-time) with optional JSON "
                       "arguments ('-': read them from standard input), or: ping, info, osinfo, time, "
                       "exec [--input FILE|-] -- CMD ARGS..., copy-to SRC DST, "
                       "copy-from SRC DST (a DST ending in / or naming a directory gets SRC's file name). "
                       "Prints JSON; on failure exits 1 and prints the error class.")
    _add_vm(agent, positional=True)
    agent.add_argument("--socket", type=Path, help="the client's agent proxy (default: the client's)")
    agent.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="deadline per call (exec: for the whole command, default 60)")
    agent.add_argument("--wait", dest="wait", action="store_true", default=True,
                       help="while the guest migrates, wait up to the deadline (default)")
    agent.add_argument("--no-wait", dest="wait", action="store_false",
                       help="while the guest migrates, fail at once with AgentBusy")
    agent.add_argument("agent_command", metavar="COMMAND")
    agent.add_argument("agent_args", nargs=argparse.REMAINDER, metavar="ARGS")

    mig = _subparser(sub, "migrate", help="live-migrate a guest to another core (clients follow it)")
    _add_vm(mig, positional=True)
    mig.add_argument("--to", required=True, metavar="DEST_NAME|URI",
                     help="a VM whose core waits with --incoming, or a QEMU migration URI")
    mig.add_argument("--dest-run-dir", type=Path, help="run directory of DEST_NAME, if not the default")
    mig.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    mig.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    mig.add_argument("--no-check", action="store_true",
                     help="do not compare the two QEMUs' machine and device arguments first")

    core = _subparser(sub, "core", help="start the per-VM core daemon alone (supervises QEMU, re-exports QMP)",
                      description="Start QEMU (or attach to one) and serve it. QEMU_ARGS follow `--`; "
                      "with none, the built-in demo guest boots.")
    _add_vm(core, positional=False)
    core.add_argument("--qmp-socket", type=Path, help="management QMP socket (default: RUN_DIR/qmp.sock)")
    core.add_argument("--qmp-tcp", type=_host_port, metavar="HOST:PORT", help="also serve QMP on TCP")
    core.add_argument("--policy", type=Path, help="QMP command policy file (TOML; see docs/policy.md)")
    core.add_argument("--qemu-binary", default=os.environ.get("VMFRONT_QEMU", "qemu-system-x86_64"))
    core.add_argument("--accel", help="accelerator (default: kvm if usable, else tcg)")
    core.add_argument("--attach", type=Path, metavar="QMP_SOCKET",
                      help="supervise an already-running QEMU through its QMP socket instead of starting one")
    core.add_argument("--ready-fd", type=int, metavar="N", help="write one line to fd N when ready, then close it")
    core.add_argument("--graceful-timeout", type=float, metavar="SECONDS",
                      help="on stop, ask the guest to power down and wait this long before quitting QEMU")
    core.add_argument("--start-timeout", type=float, default=30.0, metavar="SECONDS",
                      help="how long QEMU may take to answer QMP at start (default 30)")
    core.add_argument("--stop-timeout", type=float, default=10.0, metavar="SECONDS",
                      help="how long each stop step (quit, SIGTERM) may take before the next (default 10)")
    core.add_argument("--qmp-max-message", type=int, default=1 << 20, metavar="BYTES",
                      help="largest QMP message a peer may send (default 1 MiB)")
    core.add_argument("--qmp-max-backlog", type=int, default=8 << 20, metavar="BYTES",
                      help="unread output after which a QMP peer counts as stalled and is closed (default 8 MiB)")
    core.add_argument("--incoming", metavar="URI",
                      help="start QEMU waiting for an incoming migration on URI (auto: a unix socket in the run "
                      "dir); state.json says 'incoming' until the guest arrives")
    core.add_argument("--migrated-linger", type=float, default=60.0, metavar="SECONDS",
                      help="after the guest migrated away, keep the paused source (QMP answering, as QEMU does) "
                      "until this long after the last QMP peer left (default 60; `quit` ends it at once)")
    core.add_argument("--agent", action="store_true",
                      help="give the guest a qemu-ga channel (virtio-serial port org.qemu.guest_agent.0), relayed to "
                      "clients")
    core.add_argument("--agent-socket", type=Path, metavar="PATH",
                      help="relay this existing qemu-ga socket instead (e.g. a host-run qemu-ga -m unix-listen)")
    core.add_argument("--serial", action="store_true",
                      help="give the guest a serial port (ttyS0), relayed to clients (vmfront console)")
    core.add_argument("--clipboard", action="store_true",
                      help="give the guest QEMU's spice-vdagent peer (chardev qemu-vdagent, virtio-serial port "
                      "com.redhat.spice.0): the guest's spice-vdagent shares its clipboard with VNC viewers. Both "
                      "sides of a migration must match; QEMU 7.2 refuses to migrate with it")
    core.add_argument("--client-group", metavar="GROUP",
                      help="group of the client processes: may open control.sock, display.sock and the shm "
                      "segment (default: only the core's own group)")
    core.add_argument("--key-delay-ms", type=float, default=10.0, metavar="MS",  # core_daemon.input.KEY_DELAY_S
                      help="pause after each key event sent to the guest, so its keyboard buffer does not overflow "
                      "when keys arrive in bulk (default: %(default)g, as QEMU's own VNC server; 0: no pause)")
    core.add_argument("--vnc-password-file", type=Path, metavar="FILE",
                      help="VNC viewers must authenticate with the first line of FILE (else $VMFRONT_VNC_PASSWORD if "
                      "set); the core holds it for every client; QMP set_password changes it at run time")
    core.add_argument("--vnc-auth", choices=("none", "vnc"),
                      help="how VNC viewers authenticate (default: vnc with a password, else none); vnc without a "
                      "password lets nobody in until QMP set_password sets one, as QEMU's -vnc password=on")
    core.add_argument("--no-display", action="store_true",
                      help="do not capture the guest display into shared memory (no private VNC for QEMU)")
    core.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU_ARGS")

    client = _subparser(sub, "client", help="start the unprivileged client alone (VNC, monitor, console, agent)",
                        description="Serve VNC, the monitor, the console and the agent proxy, and attach to the "
                        "VM's core (waiting for it if needed). Started as root, it binds its listeners and then "
                        f"runs as --user (default {CLIENT_USER}). With --all (or --name given more than once) one "
                        "process serves every VM whose core runs under the run root, picking cores up as they "
                        "appear and letting go as they stop: each VM gets its own port from --vnc-ports, its "
                        "sockets in its run directory, and one --websocket port serves them all at /vnc/NAME "
                        "(docs/fleet.md).")
    client.add_argument("--name", action="append", metavar="NAME",
                        help="VM name; repeat it to serve several VMs from one process")
    client.add_argument("--all", action="store_true", help="serve every VM whose core runs under the run root")
    client.add_argument("--run-dir", type=Path, help="run directory of the one VM (default: /run/vmfront/NAME as "
                        "root, else $XDG_RUNTIME_DIR/vmfront/NAME, else a per-user tmp dir)")
    client.add_argument("--run-root", type=Path, metavar="DIR",
                        help="with --all or several --name: the directory holding the VMs' run directories "
                        "(default: /run/vmfront as root, else $XDG_RUNTIME_DIR/vmfront)")
    client.add_argument("--vnc-ports", metavar="FIRST-LAST",
                        help="with --all: give each VM its own VNC port from this range (kept while it lives, and "
                        "across restarts of this client when it can record them)")
    client.add_argument("--vnc-host", default="127.0.0.1", metavar="HOST",
                        help="with --vnc-ports: the address the VMs' ports listen on (default 127.0.0.1)")
    client.add_argument("--websocket-tokens", type=Path, metavar="FILE",
                        help="with --all: VNC over WebSocket needs ?token=T, one 'TOKEN: VMNAME [EXPIRES]' a line "
                        "in FILE (re-read when it changes); required when --websocket is not on loopback")
    client.add_argument("--web", metavar="HOST:PORT",
                        help="serve the web console here: an overview of the VMs with live thumbnails, each VM's "
                        "screen and noVNC (docs/web.md); tokens (--websocket-tokens) are required off loopback")
    client.add_argument("--web-tls-creds", type=Path, metavar="DIR",
                        help="serve the web console over HTTPS with the X.509 certificate and key in DIR (QEMU's "
                        "tls-creds-x509 layout: server-cert.pem, server-key.pem, ca-cert.pem; SIGHUP re-reads them)")
    client.add_argument("--socket-dir", type=Path, metavar="DIR",
                        help="with --all: each VM's monitor, console and agent sockets in DIR/NAME/ instead of its "
                        "run directory (for a client that may not write there, e.g. the systemd unit)")
    client.add_argument("--core", metavar="ENDPOINT", help="control channel endpoint (default: "
                        "ipc://RUN_DIR/control.sock)")
    client.add_argument("--user", help=f"when started as root: bind listeners, then become this user for good "
                        f"(default: {CLIENT_USER})")
    client.add_argument("--group", help="with --user: this group instead of the user's primary group")
    client.add_argument("--as-root", action="store_true",
                        help="when started as root: stay root (not recommended; logs a warning)")
    client.add_argument("--vnc", nargs="?", const="127.0.0.1:5900", metavar="HOST:PORT|:DISPLAY|unix:PATH",
                        help="serve VNC viewers here (bare --vnc: 127.0.0.1:5900; :N is display N, port 5900+N on "
                        "127.0.0.1)")
    client.add_argument("--vnc-password-file", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    client.add_argument("--vnc-share", choices=("allow-exclusive", "force-shared", "ignore"),
                        default="allow-exclusive",
                        help="what a viewer's shared flag does, as QEMU's -vnc share=: allow-exclusive (default: a "
                        "viewer asking for exclusive use disconnects the others, and shared viewers are refused "
                        "while it is there), force-shared (exclusive requests are refused), ignore (all share)")
    client.add_argument("--vnc-connections", type=int, default=32, metavar="N",
                        help="VNC connections still in handshake or authentication at once (default 32, as QEMU's "
                        "-vnc connections=): beyond, the oldest of them is closed, so a flood cannot lock viewers "
                        "out")
    client.add_argument("--vnc-handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="a VNC connection that has not finished its handshake and authentication this long "
                        "after it connected is closed (default 10)")
    client.add_argument("--keymap", metavar="LANG|PATH",
                        help="keyboard layout for viewers that send keysyms only (vncdotool, scripts): one of "
                        "QEMU's keymap files, as QEMU's -k (default en-us); viewers with QEMU's extended key "
                        "event send the physical key and need none")
    client.add_argument("--websocket", metavar="HOST:PORT|unix:PATH",
                        help="also serve VNC over WebSocket (noVNC); an empty HOST is 127.0.0.1; with "
                        "--vnc-tls-creds it is wss://; with --all one port for every VM, at ws://HOST:PORT/vnc/NAME")
    client.add_argument("--vnc-tls-creds", type=Path, metavar="DIR",
                        help="VeNCrypt X.509 TLS with DIR/ca-cert.pem, server-cert.pem and server-key.pem (QEMU's "
                        "tls-creds-x509 layout; the key must not be group/world readable); VNC in the clear is then "
                        "not offered. SIGHUP or QMP display-reload re-reads them")
    client.add_argument("--vnc-tls-verify-peer", action="store_true",
                        help="with --vnc-tls-creds: viewers must present a certificate signed by ca-cert.pem "
                        "(QEMU's verify-peer=on)")
    client.add_argument("--vnc-tls-anon", action="store_true",
                        help="also offer anonymous TLS (VeNCrypt TLSNone/TLSVnc): encrypted, but open to a man in the "
                        "middle; needs OpenSSL's aNULL ciphers at security level 0 and TLS 1.2")
    client.add_argument("--vnc-tls-plain-too", action="store_true",
                        help="with TLS: also offer None / VNC authentication in the clear (a downgrade anyone on the "
                        "path can force; for old viewers on trusted networks only)")
    client.add_argument("--monitor", nargs="?", const="unix:", metavar="unix:PATH|HOST:PORT",
                        help="serve the text monitor here (bare --monitor: unix:RUN_DIR/monitor.sock, mode 0600)")
    client.add_argument("--console", nargs="?", const="", metavar="PATH",
                        help="serve the guest's serial console (core --serial) here (bare --console: "
                        "RUN_DIR/console.sock, mode 0600)")
    client.add_argument("--agent-proxy", metavar="PATH|none",
                        help="guest-agent proxy socket speaking qemu-ga's protocol (default: RUN_DIR/agent.sock, "
                        "mode 0600; 'none': do not serve one)")
    client.add_argument("--ready-fd", type=int, metavar="N",
                        help="once every listener is bound, write one line to fd N, then close it")

    sub.add_parser("demo-image", help="build (if needed) and print the path of the demo guest image")
    return parser


def run_async(main: Coroutine[Any, Any, int]) -> int:
    """Run a daemon's main coroutine on uvloop: the same asyncio API, about a third less overhead per message
    (measured by benchmarks/qmp_proxy.py). ``VMFRONT_EVENT_LOOP=asyncio`` selects the stdlib loop."""
    if os.environ.get("VMFRONT_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.run(main)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _group_id(name: str) -> int:
    import grp

    try:
        return grp.getgrgid(int(name)).gr_gid if name.isdigit() else grp.getgrnam(name).gr_gid
    except KeyError:
        raise CliError(f"no such group: {name!r}") from None


def _demo_guest_args() -> list[str]:
    from core_daemon.demo_guest import DemoGuestError, demo_image_path, demo_qemu_args

    try:
        image = demo_image_path()
    except DemoGuestError as exc:
        raise CliError(f"cannot build the demo guest: {exc}") from exc
    log.info("no QEMU arguments: booting the built-in demo guest %s", image)
    return demo_qemu_args(image)


def cmd_core(args: argparse.Namespace) -> int:
    from core_daemon.policy import PolicyError, load_policy
    from core_daemon.supervisor import Core, CoreConfig, CoreError
    from core_daemon.vnc_state import AUTH_NONE, AUTH_VNC, PASSWORD_ENV, Credentials, VncStateError, read_password

    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    try:
        check_vm_name(args.name)
        policy = load_policy(args.policy)
        if not qemu_args and args.attach is None:
            qemu_args = _demo_guest_args()
        password = read_password(args.vnc_password_file)
        os.environ.pop(PASSWORD_ENV, None)  # QEMU, our child, has no use for it
        if password is not None and args.vnc_auth == AUTH_NONE:
            raise CliError("--vnc-auth none contradicts a VNC password (--vnc-password-file, $VMFRONT_VNC_PASSWORD)")
        credentials = Credentials(auth=args.vnc_auth or (AUTH_VNC if password is not None else AUTH_NONE),
                                  password=password)
        config = CoreConfig(
            name=args.name, run_dir=RunDir.for_vm(args.name, args.run_dir), qemu_args=qemu_args,
            qemu_binary=args.qemu_binary, accel=args.accel, attach=args.attach, qmp_socket=args.qmp_socket,
            qmp_tcp=args.qmp_tcp, policy=policy, ready_fd=args.ready_fd, graceful_timeout=args.graceful_timeout,
            start_timeout=args.start_timeout, stop_timeout=args.stop_timeout, max_message=args.qmp_max_message,
            max_backlog=args.qmp_max_backlog, display=not args.no_display, key_delay=args.key_delay_ms / 1000,
            client_group=_group_id(args.client_group) if args.client_group else None,
            agent=args.agent or args.agent_socket is not None, agent_socket=args.agent_socket,
            incoming=args.incoming, serial=args.serial, migrated_linger=args.migrated_linger,
            clipboard=args.clipboard,
            vnc_credentials=credentials,
        )
        code = run_async(Core(config).run())
    except (CoreError, PolicyError, RunDirError, CliError, VncStateError) as exc:
        print(f"vmfront core: error: {exc}", file=sys.stderr)
        code = exc.exit_status if isinstance(exc, CoreError) else 1
    log.info("core exiting, status %d", code)
    return code


def _client_socket(run_dir: RunDir, kind: str, default: Path) -> Path:
    """The unix socket a running client reports for ``kind`` (its hello's endpoints, in state.json), else
    ``default``: a systemd client keeps its sockets in a directory of its own. A VM that migrated keeps its name:
    its clients are looked up where it went (``migrated_to``, hop by hop)."""
    from core_daemon.pidlock import is_locked
    from core_daemon.state import read_state

    control = follow_migrations(f"ipc://{run_dir.control_socket}", run_dir.state_file)
    run_dir = RunDir(Path(control.removeprefix("ipc://")).parent)
    state = read_state(run_dir.state_file) or {}
    if is_locked(run_dir.pidfile):
        for client in state.get("clients") or []:
            where = (client.get("endpoints") or {}).get(kind) if isinstance(client, dict) else None
            if isinstance(where, str) and (where.startswith(("unix:", "/"))):
                return Path(where.removeprefix("unix:"))
    return default


def _vm_run_dir(args: argparse.Namespace) -> RunDir:
    return RunDir.for_vm(check_vm_name(args.name), args.run_dir)


def cmd_monitor(args: argparse.Namespace) -> int:
    from clients.monitor.interactive import run_interactive

    try:
        run_dir = _vm_run_dir(args)
    except RunDirError as exc:
        print(f"vmfront monitor: error: {exc}", file=sys.stderr)
        return 1
    return run_interactive(args.socket or _client_socket(run_dir, "monitor", run_dir.root / "monitor.sock"))


def cmd_console(args: argparse.Namespace) -> int:
    from clients.console.interactive import ConsoleError, run_console

    try:
        run_dir = _vm_run_dir(args)
        path = args.socket or _client_socket(run_dir, "console", run_dir.root / "console.sock")
        return run_console(path, args.name, read_only=args.read_only)
    except (RunDirError, ConsoleError) as exc:
        print(f"vmfront console: error: {exc}", file=sys.stderr)
        return 1


def _client_user(user: str | None, as_root: bool, *, flag: str) -> str | None:
    """The user a client started by root becomes: ``user``, else the system user; None keeps root (only with
    ``--as-root``/``--client-as-root``, and with a warning) or when not started by root."""
    from clients.privileges import PrivilegeError, resolve_user

    if os.geteuid() != 0:
        return user
    if as_root:
        if user is not None:
            raise PrivilegeError(f"{flag} and a user to run as contradict each other")
        log.warning("running the client as root (%s): every VNC, monitor and agent parser runs with root's rights",
                    flag)
        return None
    name = user or CLIENT_USER
    try:
        resolve_user(name)
    except PrivilegeError:
        if user is not None:
            raise
        raise PrivilegeError(f"started as root, the client runs as the system user {CLIENT_USER!r}, which does "
                             "not exist: create it (install.sh does), name another with --user/--client-user, or "
                             f"keep root with {flag} (not recommended)") from None
    return name


def cmd_client(args: argparse.Namespace) -> int:
    if args.vnc_password_file is not None:
        print("vmfront client: error: --vnc-password-file is an option of `vmfront core` (and `vmfront run`) now: "
              "the core holds the VNC credentials, so they outlive any client", file=sys.stderr)
        return 2
    if args.web_tls_creds is not None and args.web is None:
        print("vmfront client: error: --web-tls-creds goes with --web", file=sys.stderr)
        return 2
    if (args.vnc_tls_verify_peer and args.vnc_tls_creds is None) or \
            (args.vnc_tls_plain_too and not (args.vnc_tls_creds or args.vnc_tls_anon)):
        print("vmfront client: error: --vnc-tls-verify-peer needs --vnc-tls-creds, --vnc-tls-plain-too needs TLS",
              file=sys.stderr)
        return 2
    if args.web is not None and args.web_tls_creds is None:
        # The console's viewers come in through the web port: in TLS, RFB's own types are allowed inside it; in
        # the clear they would be offered VeNCrypt alone, which a browser cannot do.
        args.web_tls_creds = args.vnc_tls_creds
    from clients.vnc.tls import TlsSettings

    tls = TlsSettings(creds_dir=args.vnc_tls_creds, verify_peer=args.vnc_tls_verify_peer,
                      anonymous=args.vnc_tls_anon, plain_too=args.vnc_tls_plain_too)
    if args.all or len(args.name or ()) > 1:
        return _fleet_client(args, tls)
    if not args.name:
        print("vmfront client: error: give --name NAME (or --all)", file=sys.stderr)
        return 2
    fleet_only = [flag for flag, value in (("--vnc-ports", args.vnc_ports), ("--run-root", args.run_root),
                                           ("--websocket-tokens", args.websocket_tokens if not args.web else None),
                                           ("--socket-dir", args.socket_dir)) if value is not None]
    if fleet_only:
        print(f"vmfront client: error: {', '.join(fleet_only)} go with --all (or several --name)", file=sys.stderr)
        return 2
    args.name = args.name[0]
    from clients.main import Client, ClientConfig
    from clients.privileges import PrivilegeError
    from clients.vnc.service import VncError, service_from_args
    from ipc.channel import ChannelError

    try:
        config = ClientConfig(name=check_vm_name(args.name), run_dir=RunDir.for_vm(args.name, args.run_dir),
                              core_endpoint=args.core, group=args.group, ready_fd=args.ready_fd,
                              user=_client_user(args.user, args.as_root, flag="--as-root"))
        vnc = service_from_args(args.vnc, args.websocket, share=args.vnc_share, connections=args.vnc_connections,
                                handshake_timeout=args.vnc_handshake_timeout, keymap=args.keymap, tls=tls,
                                web_console=args.web is not None)
        if vnc is not None:
            config.services.append(vnc)
        if args.web is not None:
            from clients.tokens import TokenFile
            from clients.web.server import WebService

            config.services.append(WebService(args.web, TokenFile(args.websocket_tokens)
                                              if args.websocket_tokens else None, args.web_tls_creds))
        if args.monitor is not None:
            from clients.monitor.service import MonitorService, parse_monitor_address

            config.services.append(MonitorService(parse_monitor_address(args.monitor,
                                                                        config.run_dir.root / "monitor.sock")))
        if args.console is not None:
            from clients.console.service import ConsoleService

            config.services.append(ConsoleService(Path(args.console) if args.console
                                                  else config.run_dir.root / "console.sock"))
        if args.agent_proxy != "none":
            from clients.agent.service import AgentService

            config.services.append(AgentService(Path(args.agent_proxy) if args.agent_proxy
                                                else config.run_dir.root / "agent.sock",
                                                proxy_required=bool(args.agent_proxy)))
        code = run_async(Client(config).run())
    except (RunDirError, PrivilegeError, VncError, ValueError, ChannelError, CliError) as exc:
        print(f"vmfront client: error: {exc}", file=sys.stderr)
        code = 1
    log.info("client exiting, status %d", code)
    return code


def _fleet_client(args: argparse.Namespace, tls: TlsSettings) -> int:
    """``vmfront client --all``: one process for every VM under the run root (clients/fleet.py)."""
    from clients.fleet import FleetClient, FleetConfig, FleetError, parse_port_range
    from clients.privileges import PrivilegeError
    from clients.tokens import TokenFile, TokenFileError
    from clients.vnc.service import VncError
    from ipc.rundir import default_run_root

    single = [flag for flag, wrong in (("--run-dir", args.run_dir is not None), ("--core", args.core is not None),
                                       ("--vnc", args.vnc is not None),
                                       ("--monitor ADDRESS", args.monitor not in (None, "unix:")),
                                       ("--console PATH", args.console not in (None, "")),
                                       ("--agent-proxy PATH", args.agent_proxy not in (None, "none"))) if wrong]
    if single:
        print(f"vmfront client: error: {', '.join(single)} name one VM's endpoint; with --all each VM gets its own "
              "(--vnc-ports, --websocket; bare --monitor/--console; sockets in each run directory or --socket-dir)",
              file=sys.stderr)
        return 2
    if args.all and args.name:
        print("vmfront client: error: --all serves every VM; leave out --name (or list the VMs with --name)",
              file=sys.stderr)
        return 2
    try:
        user = _client_user(args.user, args.as_root, flag="--as-root")
        config = FleetConfig(
            run_root=Path(os.path.abspath(args.run_root)) if args.run_root else default_run_root(),
            names=[check_vm_name(n) for n in args.name] if args.name else None,
            vnc_ports=parse_port_range(args.vnc_ports) if args.vnc_ports else None, vnc_host=args.vnc_host,
            vnc_share=args.vnc_share, vnc_connections=args.vnc_connections,
            vnc_handshake_timeout=args.vnc_handshake_timeout, keymap=args.keymap,
            websocket=args.websocket, web=args.web, web_tls_creds=args.web_tls_creds, vnc_tls=tls,
            tokens=TokenFile(args.websocket_tokens) if args.websocket_tokens else None,
            monitor=args.monitor is not None, console=args.console is not None, agent=args.agent_proxy != "none",
            socket_dir=args.socket_dir, user=user, group=args.group, ready_fd=args.ready_fd)
        if user is not None and config.socket_dir is None and os.geteuid() == 0:
            # Run directories are root's: sockets of VMs found after the privilege drop could not be made there.
            config.socket_dir = Path("/run/vmfront-fleet")
        code = run_async(FleetClient(config).run())
    except (FleetError, PrivilegeError, VncError, TokenFileError, RunDirError) as exc:
        print(f"vmfront client: error: {exc}", file=sys.stderr)
        code = 1
    log.info("fleet client exiting, status %d", code)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from clients.privileges import PrivilegeError, resolve_user

    from .run import RunConfig, run_both

    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    try:
        user = _client_user(args.client_user, args.client_as_root, flag="--client-as-root")
        config = RunConfig(name=check_vm_name(args.name), run_dir=args.run_dir, qemu_args=qemu_args,
                           client_user=user, client_group=resolve_user(user).gid if user else None,
                           verbose=args.verbose, vnc=args.vnc, websocket=args.websocket, agent=args.agent,
                           web=None if args.web == "none" else args.web,
                           vnc_password_file=args.vnc_password_file, keymap=args.keymap,
                           serial=args.serial, clipboard=args.clipboard, accel=args.accel,
                           on_core_death=args.on_core_death)
    except (RunDirError, PrivilegeError) as exc:
        print(f"vmfront run: error: {exc}", file=sys.stderr)
        return 1
    code = run_async(run_both(config))
    log.info("run exiting, status %d", code)
    return code


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import MigrateError, check_same_machine, destination_after, migrate, resolve_destination

    try:
        source = RunDir.for_vm(check_vm_name(args.name), args.run_dir)
        dest = resolve_destination(args.to, args.dest_run_dir)
        if not args.no_check:
            check_same_machine(source, dest)
        info = asyncio.run(migrate(source, dest, within=args.timeout, quiet=args.quiet))
    except (MigrateError, RunDirError) as exc:
        print(f"vmfront migrate: error: {exc}", file=sys.stderr)
        return 1
    parts = [f"{info['total-time']} ms"] if "total-time" in info else []
    if "downtime" in info:
        parts.append(f"downtime {info['downtime']} ms")
    print(f"migrated {args.name} to {args.to}" + (f" in {', '.join(parts)}" if parts else ""))
    problem = destination_after(dest)
    if problem:
        print(f"vmfront migrate: warning: {problem}", file=sys.stderr)
        return 2
    return 0


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def cmd_status(args: argparse.Namespace) -> int:
    from core_daemon.pidlock import is_locked
    from core_daemon.state import read_state

    try:
        run_dir = RunDir.for_vm(check_vm_name(args.name), args.run_dir)
    except RunDirError as exc:
        print(f"vmfront status: error: {exc}", file=sys.stderr)
        return 1
    state = read_state(run_dir.state_file)
    alive = is_locked(run_dir.pidfile)
    if state is None:
        if args.json:
            print(json.dumps({"name": args.name, "core_running": alive, "state": None}))
        else:
            print(f"VM {args.name}: no state recorded in {run_dir.root}")
        return 1 if not alive else 0
    state["core_running"] = alive
    if not alive:
        state["clients"] = []  # what a dead core last wrote about its clients is not current
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
        return 0
    now = time.time()
    core = f"core pid {state.get('core_pid')}" if alive else "core not running"
    print(f"VM {state.get('name', args.name)}: {state.get('state')} ({core})")
    print(f"  QEMU:      pid {state.get('qemu_pid')}, {state.get('qemu_version') or 'version unknown'}"
          f"{', accel ' + state['accel'] if state.get('accel') else ''}"
          f"{', attached' if state.get('attached') else ''}")
    if state.get("qemu_status"):
        print(f"  status:    {state['qemu_status']}")
    for name, endpoint in (state.get("endpoints") or {}).items():
        print(f"  {name + ':':<10} {endpoint}")
    peers = state.get("peers") or []
    print(f"  QMP peers: {len(peers)}")
    for peer in peers:
        who = f"pid {peer['pid']} uid {peer['uid']}" if "pid" in peer else peer.get("remote", "?")
        print(f"    #{peer['id']} on {peer['socket']} ({who}), for {_age(now - peer['since'])}")
    clients = state.get("clients") or []
    if clients:
        print(f"  clients:   {len(clients)}")
    for client in clients:
        served = ", ".join(f"{k} {v}" for k, v in (client.get("endpoints") or {}).items())
        print(f"    {client.get('name') or 'client'} (pid {client.get('pid')} uid {client.get('uid')})"
              f"{': ' + served if served else ''}")
        for warning in client.get("warnings") or []:
            print(f"      WARNING: {warning}")
    went = state.get("migrated_to")
    if isinstance(went, str):
        where = follow_migrations(went, Path(went.removeprefix("ipc://")).parent / "state.json")
        print(f"  migrated:  to {went}" + (f" (now at {where})" if where != went else "")
              + f"; 'vmfront monitor/agent {args.name}' reach it there")
    outgoing = state.get("outgoing")
    if isinstance(outgoing, dict) and not isinstance(went, str):
        print(f"  migrating: to {outgoing.get('control') or outgoing.get('uri')}")
    failed = state.get("last_migration")
    if isinstance(failed, dict):
        print(f"  last migration: {failed.get('status')}: {failed.get('error') or 'no reason given'}"
              + (f"; the destination said: {failed['destination_error']}" if failed.get("destination_error")
                 else ""))
    last = state.get("last_exit")
    if last:
        print(f"  last exit: {last.get('reason')} (QEMU status {last.get('code')})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .lifecycle import list_vms

    rows = list_vms(args.run_root, include_stopped=args.all)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    header = ("NAME", "STATE", "QEMU PID", "CLIENTS", "VNC")
    table = [header, *((r["name"], r["state"], str(r["qemu_pid"] or "-"), str(r["clients"]), r["vnc"] or "-")
                       for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .lifecycle import LifecycleError, stop_vm

    try:
        return stop_vm(_vm_run_dir(args), args.name, timeout=args.timeout)
    except (LifecycleError, RunDirError) as exc:
        print(f"vmfront stop: error: {exc}", file=sys.stderr)
        return 1


def cmd_kill(args: argparse.Namespace) -> int:
    from .lifecycle import LifecycleError, kill_vm

    try:
        return kill_vm(_vm_run_dir(args), args.name)
    except (LifecycleError, RunDirError) as exc:
        print(f"vmfront kill: error: {exc}", file=sys.stderr)
        return 1


def cmd_demo_image(args: argparse.Namespace) -> int:
    from core_daemon.demo_guest import DemoGuestError, demo_image_path

    try:
        print(demo_image_path())
    except DemoGuestError as exc:
        print(f"vmfront demo-image: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_screendump(args: argparse.Namespace) -> int:
    from clients.screendump import ScreendumpError, screendump

    try:
        run_dir = RunDir.for_vm(check_vm_name(args.name), args.run_dir)
        width, height = screendump(run_dir.display_socket, args.file)
    except (ScreendumpError, RunDirError) as exc:
        print(f"vmfront screendump: error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: {width}x{height}")
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from clients.agent.cli import main as agent_main

    try:
        run_dir = _vm_run_dir(args)
    except RunDirError as exc:
        print(f"vmfront agent: error: {exc}", file=sys.stderr)
        return 1
    path = args.socket or _client_socket(run_dir, "agent", run_dir.root / "agent.sock")
    return agent_main(path, args.agent_command, list(args.agent_args), wait=args.wait, timeout=args.timeout)


_COMMANDS = {"agent": cmd_agent, "core": cmd_core, "client": cmd_client, "run": cmd_run, "status": cmd_status,
             "screendump": cmd_screendump, "migrate": cmd_migrate, "demo-image": cmd_demo_image,
             "monitor": cmd_monitor, "console": cmd_console, "list": cmd_list, "stop": cmd_stop, "kill": cmd_kill}
#: Long-running subcommands: an unexpected exception is logged and ends them with EXIT_INTERNAL_ERROR.
_DAEMONS = frozenset({"core", "client", "run"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose += getattr(args, "sub_verbose", 0)
    _setup_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:
        # Our reader went away (`vmfront status --json | head -1`): what it read was enough. Python would
        # complain again when flushing stdout at exit, so point stdout at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    except Exception:
        if args.command not in _DAEMONS:
            raise
        log.critical("vmfront %s: unexpected error; exiting with status %d", args.command, EXIT_INTERNAL_ERROR,
                     exc_info=True)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
