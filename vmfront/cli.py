"""``vmfront``: one program, one subcommand per job (start a core, show status, ...).

Argument parsing and process set-up only; each subcommand's work lives in the package that owns it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from ipc.rundir import RunDir, RunDirError, check_vm_name

log = logging.getLogger("vmfront")


class CliError(Exception):
    """A subcommand cannot do its job; the message is printed as ``vmfront CMD: error: ...``."""


def _setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
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
    parser.add_argument("--run-dir", type=Path, help="run directory (default: $XDG_RUNTIME_DIR/vmfront/NAME, "
                        "else /run/vmfront/NAME as root, else a per-user tmp dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmfront", description=__doc__)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: QMP traffic)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    core = sub.add_parser("core", help="start the per-VM core daemon (supervises QEMU, re-exports QMP)",
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
    core.add_argument("--agent", action="store_true",
                      help="give the guest a qemu-ga channel (virtio-serial port org.qemu.guest_agent.0), relayed to "
                      "clients")
    core.add_argument("--agent-socket", type=Path, metavar="PATH",
                      help="relay this existing qemu-ga socket instead (e.g. a host-run qemu-ga -m unix-listen)")
    core.add_argument("--client-group", metavar="GROUP",
                      help="group of the client processes: may open control.sock, display.sock and the shm "
                      "segment (default: only the core's own group)")
    core.add_argument("--key-delay-ms", type=float, default=10.0, metavar="MS",  # core_daemon.input.KEY_DELAY_S
                      help="pause after each key event sent to the guest, so its keyboard buffer does not overflow "
                      "when keys arrive in bulk (default: %(default)g, as QEMU's own VNC server; 0: no pause)")
    core.add_argument("--no-display", action="store_true",
                      help="do not capture the guest display into shared memory (no private VNC for QEMU)")
    core.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU_ARGS")

    client = sub.add_parser("client", help="start the unprivileged client (VNC, monitor, guest agent)",
                            description="Attach to the VM's core (waiting for it if needed) and serve.")
    _add_vm(client, positional=False)
    client.add_argument("--core", metavar="ENDPOINT", help="control channel endpoint (default: "
                        "ipc://RUN_DIR/control.sock)")
    client.add_argument("--user", help="when started as root: bind listeners, then become this user for good")
    client.add_argument("--group", help="with --user: this group instead of the user's primary group")
    client.add_argument("--vnc", nargs="?", const="127.0.0.1:5900", metavar="HOST:PORT|unix:PATH",
                        help="serve VNC viewers here (bare --vnc: 127.0.0.1:5900)")
    client.add_argument("--vnc-password-file", type=Path, metavar="FILE",
                        help="VNC authentication with the first line of FILE (else $VMFRONT_VNC_PASSWORD if set)")
    client.add_argument("--websocket", metavar="HOST:PORT|unix:PATH", help="also serve VNC over WebSocket (noVNC)")
    client.add_argument("--monitor", nargs="?", const="unix:", metavar="unix:PATH|HOST:PORT",
                        help="serve the text monitor here (bare --monitor: unix:RUN_DIR/monitor.sock, mode 0600)")
    client.add_argument("--agent-proxy", metavar="PATH|none",
                        help="guest-agent proxy socket speaking qemu-ga's protocol (default: RUN_DIR/agent.sock, "
                        "mode 0600; 'none': do not serve one)")

    run = sub.add_parser("run", help="start core and client together, for interactive use",
                         description="Starts `vmfront core` and `vmfront client` as child processes; restarts "
                         "the client if it dies; Ctrl-C stops both. QEMU_ARGS follow `--` (none: the demo guest).")
    _add_vm(run, positional=False)
    run.add_argument("--client-user", metavar="USER", help="run the client as this user (when root)")
    run.add_argument("--vnc", default="127.0.0.1:5900", metavar="HOST:PORT|unix:PATH",
                     help="where the client serves VNC (default 127.0.0.1:5900)")
    run.add_argument("--websocket", metavar="HOST:PORT", help="also serve VNC over WebSocket (noVNC)")
    run.add_argument("--agent", action="store_true", help="give the guest a qemu-ga channel (see core --agent)")
    run.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- QEMU_ARGS")

    mig = sub.add_parser("migrate", help="live-migrate a guest to another core (clients follow it)")
    _add_vm(mig, positional=True)
    mig.add_argument("--to", required=True, metavar="DEST_NAME|URI",
                     help="a VM whose core waits with --incoming, or a QEMU migration URI")
    mig.add_argument("--dest-run-dir", type=Path, help="run directory of DEST_NAME, if not the default")
    mig.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    mig.add_argument("-q", "--quiet", action="store_true", help="no progress line")

    monitor = sub.add_parser("monitor", help="interactive text monitor of a running client (history, completion)",
                             description="Connects to the client's monitor socket (vmfront client --monitor).")
    _add_vm(monitor, positional=True)
    monitor.add_argument("--socket", type=Path, help="monitor socket (default: RUN_DIR/monitor.sock)")

    status = sub.add_parser("status", help="show a VM's state")
    _add_vm(status, positional=True)
    status.add_argument("--json", action="store_true", help="print state.json as JSON for scripts")

    dump = sub.add_parser("screendump", help="write the guest's current screen as PNG, from shared memory",
                          description="Reads the shared framebuffer read-only: no QMP call, no path handed to QEMU.")
    _add_vm(dump, positional=True)
    dump.add_argument("file", type=Path, help="PNG file to write")

    agent = sub.add_parser("agent", help="talk to the guest agent (qemu-ga) through the client's agent proxy",
                           description="COMMAND is a qemu-ga command (e.g. guest-get-time) with optional JSON "
                           "arguments, or: ping, info, osinfo, time, exec -- CMD ARGS..., copy-to SRC DST, "
                           "copy-from SRC DST. Prints JSON; on failure exits 1 and prints the error class.")
    _add_vm(agent, positional=True)
    agent.add_argument("--socket", type=Path, help="the client's agent proxy (default: RUN_DIR/agent.sock)")
    agent.add_argument("--timeout", type=float, metavar="SECONDS",
                       help="deadline per call (exec: for the whole command, default 60)")
    agent.add_argument("--wait", dest="wait", action="store_true", default=True,
                       help="while the guest migrates, wait up to the deadline (default)")
    agent.add_argument("--no-wait", dest="wait", action="store_false",
                       help="while the guest migrates, fail at once with AgentBusy")
    agent.add_argument("agent_command", metavar="COMMAND")
    agent.add_argument("agent_args", nargs=argparse.REMAINDER, metavar="ARGS")

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

    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    try:
        check_vm_name(args.name)
        policy = load_policy(args.policy)
        if not qemu_args and args.attach is None:
            qemu_args = _demo_guest_args()
        config = CoreConfig(
            name=args.name, run_dir=RunDir.for_vm(args.name, args.run_dir), qemu_args=qemu_args,
            qemu_binary=args.qemu_binary, accel=args.accel, attach=args.attach, qmp_socket=args.qmp_socket,
            qmp_tcp=args.qmp_tcp, policy=policy, ready_fd=args.ready_fd, graceful_timeout=args.graceful_timeout,
            start_timeout=args.start_timeout, stop_timeout=args.stop_timeout, max_message=args.qmp_max_message,
            max_backlog=args.qmp_max_backlog, display=not args.no_display, key_delay=args.key_delay_ms / 1000,
            client_group=_group_id(args.client_group) if args.client_group else None,
            agent=args.agent or args.agent_socket is not None, agent_socket=args.agent_socket,
            incoming=args.incoming,
        )
        code = run_async(Core(config).run())
    except (CoreError, PolicyError, RunDirError, CliError) as exc:
        print(f"vmfront core: error: {exc}", file=sys.stderr)
        return 1
    return code


def cmd_monitor(args: argparse.Namespace) -> int:
    from clients.monitor.interactive import run_interactive

    try:
        run_dir = RunDir.for_vm(check_vm_name(args.name), args.run_dir)
    except RunDirError as exc:
        print(f"vmfront monitor: error: {exc}", file=sys.stderr)
        return 1
    return run_interactive(args.socket or run_dir.root / "monitor.sock")


def cmd_client(args: argparse.Namespace) -> int:
    from clients.main import Client, ClientConfig
    from clients.privileges import PrivilegeError
    from clients.vnc.service import VncError, service_from_args
    from ipc.channel import ChannelError

    try:
        config = ClientConfig(name=check_vm_name(args.name), run_dir=RunDir.for_vm(args.name, args.run_dir),
                              core_endpoint=args.core, user=args.user, group=args.group)
        vnc = service_from_args(args.vnc, args.vnc_password_file, args.websocket)
        if vnc is not None:
            config.services.append(vnc)
        if args.monitor is not None:
            from clients.monitor.service import MonitorService, parse_monitor_address

            config.services.append(MonitorService(parse_monitor_address(args.monitor,
                                                                        config.run_dir.root / "monitor.sock")))
        if args.agent_proxy != "none":
            from clients.agent.service import AgentService

            config.services.append(AgentService(Path(args.agent_proxy) if args.agent_proxy
                                                else config.run_dir.root / "agent.sock",
                                                proxy_required=bool(args.agent_proxy)))
        return run_async(Client(config).run())
    except (RunDirError, PrivilegeError, VncError, ValueError, ChannelError) as exc:
        print(f"vmfront client: error: {exc}", file=sys.stderr)
        return 1


def cmd_run(args: argparse.Namespace) -> int:
    from clients.privileges import PrivilegeError

    from .run import RunConfig, run_both

    qemu_args = list(args.qemu_args)
    if qemu_args[:1] == ["--"]:
        qemu_args = qemu_args[1:]
    try:
        config = RunConfig(name=check_vm_name(args.name), run_dir=args.run_dir, qemu_args=qemu_args,
                           client_user=args.client_user, verbose=args.verbose, vnc=args.vnc,
                           websocket=args.websocket, agent=args.agent)
    except RunDirError as exc:
        print(f"vmfront run: error: {exc}", file=sys.stderr)
        return 1
    try:
        return run_async(run_both(config))
    except PrivilegeError as exc:
        print(f"vmfront run: error: {exc}", file=sys.stderr)
        return 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import MigrateError, migrate, resolve_destination

    try:
        source = RunDir.for_vm(check_vm_name(args.name), args.run_dir)
        uri, control = resolve_destination(args.to, args.dest_run_dir)
        info = asyncio.run(migrate(source.qmp_socket, uri, control, within=args.timeout, quiet=args.quiet))
    except (MigrateError, RunDirError) as exc:
        print(f"vmfront migrate: error: {exc}", file=sys.stderr)
        return 1
    timing = f" in {info['total-time']} ms (downtime {info.get('downtime', '?')} ms)" if "total-time" in info else ""
    print(f"migrated {args.name} to {args.to}{timing}")
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
    last = state.get("last_exit")
    if last:
        print(f"  last exit: {last.get('reason')} (QEMU status {last.get('code')})")
    return 0


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
        path = args.socket or RunDir.for_vm(check_vm_name(args.name), args.run_dir).root / "agent.sock"
    except RunDirError as exc:
        print(f"vmfront agent: error: {exc}", file=sys.stderr)
        return 1
    return agent_main(path, args.agent_command, list(args.agent_args), wait=args.wait, timeout=args.timeout)


_COMMANDS = {"agent": cmd_agent, "core": cmd_core, "client": cmd_client, "run": cmd_run, "status": cmd_status,
             "screendump": cmd_screendump, "migrate": cmd_migrate, "demo-image": cmd_demo_image,
             "monitor": cmd_monitor}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return _COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
