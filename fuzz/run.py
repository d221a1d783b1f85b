"""Run one fuzz target for a bounded time: ``python fuzz/run.py TARGET [--seconds N] [--corpus DIR]``.

With atheris importable (``pip install atheris``) this is libFuzzer with coverage feedback: the seeds in
``tests/fuzz_corpus/TARGET/`` are read (never written), new inputs go to ``--corpus DIR`` (a temporary directory
by default). Without atheris (or with ``--engine hypothesis``) it is a hypothesis loop over random bytes and
mutations of the seeds, for the same time. Either way the exit status is non-zero on a crash, the reproducer is
printed in hex and saved as ``tests/fuzz_corpus/crashes/TARGET-SHA1.bin`` (replayed by
``tests/test_fuzz_targets.py``). Replay a file: ``python fuzz/run.py TARGET --replay FILE``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEEDS = ROOT / "tests" / "fuzz_corpus"
CRASHES = SEEDS / "crashes"
TARGET_NAMES = ("qmp", "rfb_client", "rfb_server", "clipboard", "ipc", "agent", "monitor", "dump", "hextile")


def save_crash(target: str, data: bytes, exc: BaseException) -> Path:
    """Print and keep a reproducer; returns its path."""
    CRASHES.mkdir(parents=True, exist_ok=True)
    path = CRASHES / f"{target}-{hashlib.sha1(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    print(f"\n=== CRASH in target {target}: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"reproducer ({len(data)} bytes, hex): {data.hex()}", file=sys.stderr)
    print(f"saved as {path}", file=sys.stderr)
    return path


def load_seeds(target: str) -> list[bytes]:
    folder = SEEDS / target
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


def run_atheris(target: str, seconds: int, corpus: Path | None) -> int:
    import atheris  # type: ignore[import-not-found, unused-ignore]

    with atheris.instrument_imports(include=["clients", "core_daemon", "ipc", "rfb", "fuzz"]):
        from fuzz.targets import TARGETS
    func = TARGETS[target]

    def one_input(data: bytes) -> None:
        try:
            func(data)
        except BaseException as exc:
            save_crash(target, data, exc)
            raise

    work = corpus or Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
    work.mkdir(parents=True, exist_ok=True)
    seed_dir = SEEDS / target
    argv = [sys.argv[0], f"-max_total_time={seconds}", "-timeout=10", "-rss_limit_mb=2048", "-max_len=4096",
            f"-artifact_prefix={tempfile.gettempdir()}/fuzz-{target}-", "-print_final_stats=1", str(work)]
    if seed_dir.is_dir():
        argv.append(str(seed_dir))  # libFuzzer writes new units to the first corpus directory only
    atheris.Setup(argv, one_input)
    atheris.Fuzz()  # exits the process: 0 when the time is up, non-zero on a crash
    return 0


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: flip, insert, delete, truncate, duplicate a slice."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        at = pos % (len(buf) + 1)
        if kind == 0 and buf:
            buf[at % len(buf)] ^= value or 1
        elif kind == 1:
            buf[at:at] = bytes([value])
        elif kind == 2 and buf:
            del buf[at % len(buf)]
        elif kind == 3:
            del buf[at:]
        elif kind == 4 and buf:
            buf[at:at] = buf[at : at + value % 32]
        elif kind == 5:
            buf[at:at] = bytes([0xFF, 0x0A, 0x7B, 0x7D, 0x22, 0x00][value % 6 :])[:1]
    return bytes(buf)


def run_hypothesis(target: str, seconds: float, *, max_size: int = 2048, quiet: bool = False) -> int:
    """A time-bounded hypothesis loop; returns 0, or 1 after saving a crash."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from fuzz.targets import TARGETS

    func: Callable[[bytes], None] = TARGETS[target]
    seeds = load_seeds(target)
    edits = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8)
    inputs = st.binary(max_size=max_size)
    if seeds:
        mutated = st.builds(mutate, st.sampled_from(seeds), edits)
        spliced = st.builds(lambda a, b, cut: a[:cut] + b[cut:], st.sampled_from(seeds), st.sampled_from(seeds),
                            st.integers(0, 512))
        inputs = st.one_of(inputs, mutated, spliced, st.sampled_from(seeds))
    failing: list[tuple[bytes, BaseException]] = []
    deadline = time.monotonic() + seconds

    @settings(max_examples=2000, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
    @given(inputs)
    def check(data: bytes) -> None:
        try:
            func(data)
        except BaseException as exc:
            failing.append((data, exc))
            raise

    rounds = examples = 0
    while time.monotonic() < deadline:
        rounds += 1
        try:
            check()
        except Exception:
            data, exc = failing[-1]  # hypothesis replays the shrunk example last
            traceback.print_exception(exc)
            save_crash(target, data, exc)
            return 1
        examples += 2000
    if not quiet:
        print(f"{target}: {rounds} rounds, about {examples} inputs in {seconds:.0f} s (hypothesis), no crash")
    return 0


def replay(target: str, path: Path) -> int:
    from fuzz.targets import TARGETS

    data = path.read_bytes()
    try:
        TARGETS[target](data)
    except BaseException as exc:
        traceback.print_exception(exc)
        print(f"reproducer ({len(data)} bytes, hex): {data.hex()}", file=sys.stderr)
        return 1
    print(f"{path}: no crash")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", choices=TARGET_NAMES)
    parser.add_argument("--seconds", type=int, default=60, help="how long to fuzz (default 60)")
    parser.add_argument("--corpus", type=Path, help="atheris: directory for new inputs (default: a temp dir)")
    parser.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    parser.add_argument("--replay", type=Path, help="run the target once on this file and exit")
    parser.add_argument("--skip-known", action="store_true",
                        help="step over the reported, unfixed bugs (KNOWN_CRASHES) to look for new ones")
    args = parser.parse_args(argv)
    if args.skip_known:
        os.environ["FUZZ_SKIP_KNOWN"] = "1"  # read when fuzz.targets is imported, below
    if args.replay:
        return replay(args.target, args.replay)
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            engine = "hypothesis"
        else:
            engine = "atheris"
    print(f"fuzzing {args.target} for {args.seconds} s with {engine} (pid {os.getpid()})", flush=True)
    if engine == "atheris":
        return run_atheris(args.target, args.seconds, args.corpus)
    return run_hypothesis(args.target, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
