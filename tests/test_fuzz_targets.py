"""The fuzz targets (fuzz/targets.py) over their seed corpus, a short hypothesis pass each, and every saved crash.

Long runs are ``python fuzz/run.py TARGET --seconds 60`` (atheris if installed, hypothesis otherwise); what they
find lands in tests/fuzz_corpus/crashes/ and is replayed here as a regression test. A crash that is reported but
not fixed yet goes into ``KNOWN_CRASHES`` (strict xfail: the test fails once the parser is fixed, so the entry
gets removed).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import targets as fuzz_targets  # noqa: E402
from fuzz.run import mutate  # noqa: E402
from fuzz.targets import TARGETS, chunks  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
CRASHES = CORPUS / "crashes"

#: crash file name -> why it is not fixed yet (reported to the owner).
KNOWN_CRASHES: dict[str, str] = {
    # (empty: the three crashes found so far are fixed; their reproducers replay below as regression tests)
}


def seed_files() -> list[tuple[str, Path]]:
    return [(target, path) for target in TARGETS for path in sorted((CORPUS / target).glob("*")) if path.is_file()]


def crash_files() -> list[Path]:
    return sorted(CRASHES.glob("*.bin")) if CRASHES.is_dir() else []


def test_every_target_has_seeds() -> None:
    assert {target for target, _ in seed_files()} == set(TARGETS)


@pytest.mark.parametrize(("target", "path"), seed_files(), ids=lambda v: v.name if isinstance(v, Path) else v)
def test_seed(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("path", crash_files(), ids=lambda p: p.name)
def test_crash_regression(path: Path, request: pytest.FixtureRequest) -> None:
    if path.name in KNOWN_CRASHES:
        request.applymarker(pytest.mark.xfail(reason=KNOWN_CRASHES[path.name], strict=True))
    target = next(t for t in sorted(TARGETS, key=len, reverse=True) if path.name.startswith(f"{t}-"))
    TARGETS[target](path.read_bytes())


def test_chunks_cover_the_data_and_are_deterministic() -> None:
    for data in (b"", b"x", bytes(range(256)) * 3):
        pieces = list(chunks(data))
        assert b"".join(pieces) == data
        assert pieces == list(chunks(data))


def _inputs(target: str) -> st.SearchStrategy[bytes]:
    seeds = [p.read_bytes() for p in sorted((CORPUS / target).glob("*")) if p.is_file()]
    edits = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6)
    return st.one_of(st.binary(max_size=512), st.builds(mutate, st.sampled_from(seeds), edits))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_short_hypothesis_pass(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The known, reported bugs have their own strict-xfail regression tests above; here, look for new ones.
    monkeypatch.setattr(fuzz_targets, "SKIP_KNOWN", True)
    func = TARGETS[target]

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(_inputs(target))
    def check(data: bytes) -> None:
        func(data)

    check()


@pytest.mark.parametrize("expr", ["1-", "2*", "(1+", "10 +"])
def test_monitor_integer_expression_ending_in_an_operator_is_an_arg_error(expr: str) -> None:
    """Found by fuzz_monitor (monitor-2afe1521a7101f55.bin): a trailing operator used to raise StopIteration,
    which a coroutine turns into RuntimeError, dropping the monitor connection."""
    from clients.monitor.parser import ArgError, parse_int

    with pytest.raises(ArgError, match="unexpected end of expression"):
        parse_int(expr)


def test_every_target_is_runnable_and_run_in_ci() -> None:
    """fuzz/run.py names its targets without importing them (atheris instruments that import) and .ci/run lists
    them again: neither may forget one."""
    from fuzz.run import TARGET_NAMES

    assert set(TARGET_NAMES) == set(TARGETS)
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    listed = next(line for line in ci.splitlines() if line.startswith("for target in ")).split(";")[0].split()[3:]
    assert set(listed) == set(TARGETS), listed
