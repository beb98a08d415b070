"""Tests for sim.traces: reading Mahimahi and rate traces, synthetic traces, specs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tandem.sim.traces import (
    PACKET_BYTES,
    Trace,
    TraceError,
    constant,
    on_off,
    parse_spec,
    random_walk,
    read_mahimahi,
    read_pair,
    read_rate_trace,
    read_trace,
    steps,
)

TRACES = Path(__file__).resolve().parents[1].parent / "shared" / "traces"

# From ../shared/traces/README.md: prefix -> (duration s, up Mbit/s, down Mbit/s).
MAHIMAHI = {
    "ATT-LTE-driving-2016": (120.0, 1.9, 4.6),
    "Verizon-LTE-short": (140.0, 6.0, 5.0),
    "TMobile-UMTS-driving": (930.0, 0.9, 2.0),
}


def _traces(sub: str) -> Path:
    path = TRACES / sub
    if not path.is_dir():
        pytest.skip(f"no shared traces at {path}")
    return path


def _write(tmp_path: Path, text: str, name: str = "trace") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _mahimahi(tmp_path: Path, ms: list[int], name: str = "mm") -> Trace:
    return read_mahimahi(_write(tmp_path, "".join(f"{m}\n" for m in ms), name))


def _rates(trace: Trace) -> np.ndarray:
    """The Mbit/s of each segment of a rate trace."""
    return np.diff(trace.cum_bytes) / np.diff(trace.times_s) * 8 / 1e6


# ----------------------------------------------------------------------------- real traces


@pytest.mark.parametrize("prefix", sorted(MAHIMAHI))
def test_mahimahi_pairs_match_readme(prefix: str) -> None:
    """Mean rates and durations of each pair agree with the README's table."""
    duration, up_mbps, down_mbps = MAHIMAHI[prefix]
    pair = read_pair(_traces("mahimahi") / prefix)
    assert pair.up.shape == pair.down.shape == "steps"
    assert pair.up.mean_mbps == pytest.approx(up_mbps, abs=0.1)
    assert pair.down.mean_mbps == pytest.approx(down_mbps, abs=0.1)
    assert pair.up.period_s == pytest.approx(duration, rel=0.005)
    assert pair.down.period_s == pytest.approx(duration, rel=0.005)
    assert pair.up.name == f"{prefix}.up"
    assert pair.down.name == f"{prefix}.down"


@pytest.mark.parametrize("prefix", sorted(MAHIMAHI))
def test_mahimahi_period_bytes_is_one_packet_per_line(prefix: str) -> None:
    """Every line is one 1,500-byte opportunity, and a period ends at the last timestamp."""
    path = _traces("mahimahi") / f"{prefix}.up"
    ms = [int(line) for line in path.read_text().split()]
    trace = read_trace(path)
    assert trace.period_bytes == len(ms) * PACKET_BYTES
    assert trace.period_s == ms[-1] / 1000
    assert trace.capacity(0.0) == 0.0


def test_norway_rate_traces_are_plausible() -> None:
    """Each 3G trace reads as a linear trace of 0.1-6 Mbit/s spanning the file's time range."""
    files = sorted(_traces("norway-3g").iterdir())
    assert files
    for path in files:
        trace = read_trace(path)
        rows = np.loadtxt(path)
        span = rows[-1, 0] - rows[0, 0]
        assert trace.shape == "linear", path.name
        assert 0.1 < trace.mean_mbps < 6.0, path.name
        # The last sample holds for the median interval (0.5-1 s), then the trace repeats.
        assert span < trace.period_s <= span + float(np.max(np.diff(rows[:, 0]))), path.name
        assert trace.period_s == pytest.approx(span, abs=2.0), path.name


def test_read_trace_dispatches_on_columns() -> None:
    mm = read_trace(_traces("mahimahi") / "Verizon-LTE-short.down")
    rate = read_trace(_traces("norway-3g") / "norway_bus_1")
    assert (mm.shape, rate.shape) == ("steps", "linear")


# ------------------------------------------------------------------------ Mahimahi semantics


def test_several_packets_in_one_millisecond(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path, [1, 1, 3])
    assert trace.period_s == pytest.approx(0.003)
    assert trace.period_bytes == 3 * PACKET_BYTES
    assert trace.capacity(0.0) == 0
    assert trace.capacity(0.0005) == 0
    assert trace.capacity(0.001) == 2 * PACKET_BYTES  # both packets at 1 ms at once
    assert trace.capacity(0.002) == 2 * PACKET_BYTES
    assert trace.capacity(0.0029) == 2 * PACKET_BYTES
    assert trace.capacity(0.003) == 3 * PACKET_BYTES
    assert trace.mean_mbps == pytest.approx(3 * PACKET_BYTES * 8 / 0.003 / 1e6)


def test_capacity_steps_hold_between_opportunities(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path, [2, 5, 5, 5, 9, 10])
    expected = {0.0: 0, 0.0019: 0, 0.002: 1, 0.0049: 1, 0.005: 4, 0.0089: 4, 0.009: 5, 0.01: 6}
    for t, packets in expected.items():
        assert trace.capacity(t) == packets * PACKET_BYTES, t


def test_wrap_around_repeats_the_trace(tmp_path: Path) -> None:
    """After its last timestamp the trace starts again: capacity(k*period + x) is k periods'
    bytes plus capacity(x). Points sit between opportunities, clear of float ties."""
    trace = _mahimahi(tmp_path, [1, 1, 3, 7, 7, 7, 10])
    assert trace.period_bytes == 7 * PACKET_BYTES
    for k in range(60):
        for x in (0.0005, 0.0015, 0.002, 0.0045, 0.0085, 0.0095):
            t = k * trace.period_s + x
            assert trace.capacity(t) == k * trace.period_bytes + trace.capacity(x), (k, x)


def test_wrap_around_at_exact_boundaries(tmp_path: Path) -> None:
    """With binary-exact timestamps (1/4 s), lap boundaries and steps are exact too."""
    trace = _mahimahi(tmp_path, [250, 250, 500, 1000])
    assert (trace.period_s, trace.period_bytes) == (1.0, 4 * PACKET_BYTES)
    within = {0.0: 0, 0.25: 2, 0.5: 3, 0.75: 3}
    for k in range(10):
        for x, packets in within.items():
            assert trace.capacity(k + x) == (4 * k + packets) * PACKET_BYTES, (k, x)


def test_wrap_around_on_millisecond_steps(tmp_path: Path) -> None:
    """A Mahimahi step at x ms still counts on later laps, and time_for's answer reaches its
    bytes; both fail from float rounding in divmod (e.g. capacity(0.03) on a 10 ms trace)."""
    trace = _mahimahi(tmp_path, [1, 1, 3, 7, 7, 7, 10])
    misses: list[tuple[int, float | str]] = []
    for k in range(1, 20):
        for x in trace.times_s[1:]:
            if trace.capacity(k * trace.period_s + x) != k * trace.period_bytes + trace.capacity(x):
                misses.append((k, float(x)))
        n = k * trace.period_bytes
        if trace.capacity(trace.time_for(n)) < n:
            misses.append((k, "time_for"))
    assert misses == []


def test_opportunity_at_zero_ms_counts_at_the_lap_end(tmp_path: Path) -> None:
    """A 0 ms opportunity is where the previous lap ends: capacity at 0 is 0, every lap the same."""
    trace = _mahimahi(tmp_path, [0, 2, 4])
    assert trace.period_s == pytest.approx(0.004)
    assert trace.period_bytes == 3 * PACKET_BYTES
    assert trace.capacity(0.0) == 0
    assert trace.capacity(0.001) == 0
    assert trace.capacity(0.002) == PACKET_BYTES
    assert trace.capacity(0.003) == PACKET_BYTES
    assert trace.capacity(0.004) == 3 * PACKET_BYTES
    assert trace.capacity(0.005) == 3 * PACKET_BYTES


def test_zero_ms_only_at_start_keeps_count(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path, [0, 0, 5])
    assert trace.period_bytes == 3 * PACKET_BYTES
    assert trace.capacity(0.0049) == 0
    assert trace.capacity(0.005) == 3 * PACKET_BYTES


def test_time_for_is_the_inverse_of_capacity(tmp_path: Path) -> None:
    """time_for(n) is the earliest time capacity reaches n, at many points over several laps,
    lap boundaries included (binary-exact timestamps, so no float ties)."""
    trace = _mahimahi(tmp_path, [125, 250, 250, 500, 875, 1000])
    laps = 5
    sizes = [*range(1, laps * 6 * PACKET_BYTES + 2, 97)]
    sizes += [k * PACKET_BYTES + d for k in range(1, 6 * laps + 1) for d in (-1, 0, 1)]
    for n in sizes:
        t = trace.time_for(n)
        assert trace.capacity(t) >= n, n
        assert trace.capacity(t - 1e-6) < n, n  # nothing earlier reaches n
    rng = np.random.default_rng(0)
    points = [*rng.uniform(0, laps, 500), *np.arange(0, laps + 0.01, 0.125)]
    for t in points:
        assert trace.time_for(trace.capacity(t)) <= t, t


def test_time_for_whole_periods_ends_the_lap(tmp_path: Path) -> None:
    trace = _mahimahi(tmp_path, [250, 500, 1000])
    assert trace.time_for(0) == 0.0
    assert trace.time_for(-10) == 0.0
    assert trace.time_for(1) == 0.25
    assert trace.time_for(PACKET_BYTES) == 0.25
    assert trace.time_for(PACKET_BYTES + 1) == 0.5
    assert trace.time_for(trace.period_bytes) == 1.0  # the end of lap one, not lap two's start
    assert trace.time_for(2 * trace.period_bytes) == 2.0
    assert trace.time_for(2 * trace.period_bytes + 1) == 2.25


# -------------------------------------------------------------------------------- rate traces


def test_two_column_trace_with_irregular_times(tmp_path: Path) -> None:
    """Times are rebased to 0; each rate holds to the next sample, the last for the median
    interval; capacity is linear in between."""
    path = _write(tmp_path, "100.0 1\n100.5 2\n\n101.5  4\n102.0 2\n")
    trace = read_rate_trace(path)
    assert trace.shape == "linear"
    # intervals 0.5, 1.0 and 0.5: the last sample holds for their median, 0.5 s
    np.testing.assert_allclose(trace.times_s, [0.0, 0.5, 1.5, 2.0, 2.5])
    np.testing.assert_allclose(trace.cum_bytes, [0.0, 62_500, 312_500, 562_500, 687_500])
    assert trace.period_s == pytest.approx(2.5)
    assert trace.capacity(0.25) == pytest.approx(31_250)
    assert trace.capacity(1.0) == pytest.approx(62_500 + 125_000)
    assert trace.capacity(2.25) == pytest.approx(562_500 + 62_500)
    assert trace.capacity(2.5 + 0.25) == pytest.approx(687_500 + 31_250)
    assert trace.mean_mbps == pytest.approx(687_500 * 8 / 2.5 / 1e6)
    assert trace.time_for(62_500 + 125_000) == pytest.approx(1.0)
    assert read_trace(path).cum_bytes.tolist() == trace.cum_bytes.tolist()


def test_single_sample_rate_trace_holds_one_second(tmp_path: Path) -> None:
    trace = read_trace(_write(tmp_path, "7.0 8\n"))
    assert trace.period_s == 1.0
    assert trace.period_bytes == pytest.approx(1e6)


def test_constant() -> None:
    trace = constant(8.0)
    assert trace.mean_mbps == pytest.approx(8.0)
    for t in (0.0, 0.3, 1.0, 2.5, 17.75):
        assert trace.capacity(t) == pytest.approx(1e6 * t)
    assert trace.time_for(2_500_000) == pytest.approx(2.5)
    assert constant(2.0, period_s=5.0).period_bytes == pytest.approx(1.25e6)


def test_steps() -> None:
    trace = steps([1.0, 5.0], 2.0)
    assert trace.period_s == 4.0
    assert trace.capacity(1.0) == pytest.approx(125_000)
    assert trace.capacity(3.0) == pytest.approx(250_000 + 625_000)
    assert trace.capacity(5.0) == pytest.approx(1_500_000 + 125_000)
    assert trace.mean_mbps == pytest.approx(3.0)
    np.testing.assert_allclose(_rates(trace), [1.0, 5.0])


def test_random_walk_is_deterministic_per_seed() -> None:
    a = random_walk(3.0, 1.0, 0.5, 60.0, seed=4)
    b = random_walk(3.0, 1.0, 0.5, 60.0, seed=4)
    c = random_walk(3.0, 1.0, 0.5, 60.0, seed=5)
    np.testing.assert_array_equal(a.cum_bytes, b.cum_bytes)
    assert not np.allclose(a.cum_bytes, c.cum_bytes)
    assert a.period_s == pytest.approx(60.0)
    assert len(a.times_s) == 121
    rates = _rates(a)
    assert rates[0] == pytest.approx(3.0)  # starts at the mean
    assert len(np.unique(np.round(rates, 9))) > 50  # it does move


def test_random_walk_respects_the_floor() -> None:
    trace = random_walk(1.0, 5.0, 0.1, 60.0, seed=3, floor_mbps=0.2)
    rates = _rates(trace)
    assert rates.min() >= 0.2 - 1e-9
    assert np.sum(np.isclose(rates, 0.2)) > 10  # the floor binds often at this sigma


def test_random_walk_is_pulled_towards_the_mean() -> None:
    rates = _rates(random_walk(4.0, 0.5, 1.0, 2000.0, seed=1))
    assert rates.mean() == pytest.approx(4.0, abs=0.3)


def test_random_walk_floor_applies_to_the_first_step() -> None:
    rates = _rates(random_walk(0.0, 0.5, 1.0, 20.0, seed=1, floor_mbps=0.05))
    assert rates.min() >= 0.05 - 1e-9


def test_on_off_has_no_capacity_in_the_outage() -> None:
    trace = on_off(8.0, 1.0, 0.5)
    assert trace.period_s == 1.5
    assert trace.capacity(1.0) == pytest.approx(1e6)
    assert trace.capacity(1.4) == pytest.approx(1e6)
    assert trace.capacity(1.5 + 0.25) == pytest.approx(1.25e6)
    # Bytes just past an on-period's worth wait out the whole outage.
    assert trace.time_for(1e6) == pytest.approx(1.0)
    assert trace.time_for(1e6 + 1) == pytest.approx(1.5 + 1e-6)
    assert trace.time_for(2e6 + 1000) == pytest.approx(3.0 + 1e-3)
    assert trace.mean_mbps == pytest.approx(8.0 * 1.0 / 1.5)


def test_linear_time_for_inverts_capacity() -> None:
    rng = np.random.default_rng(2)
    for trace in (steps([1.0, 5.0, 0.5, 3.0], 0.7), random_walk(3.0, 1.0, 0.5, 30.0, seed=2)):
        for t in rng.uniform(0, 4 * trace.period_s, 300):
            assert trace.time_for(trace.capacity(t)) == pytest.approx(t, abs=1e-9)
        for n in rng.uniform(1, 4 * trace.period_bytes, 300):
            assert trace.capacity(trace.time_for(n)) == pytest.approx(n, rel=1e-12)


def test_trace_rejects_bad_arrays() -> None:
    t, c = np.array([0.0, 1.0]), np.array([0.0, 10.0])
    assert Trace("ok", t, c, 1.0, "linear").period_bytes == 10.0
    with pytest.raises(TraceError, match="equal"):
        Trace("x", t, np.array([0.0, 1.0, 2.0]), 1.0, "linear")
    with pytest.raises(TraceError, match="not decrease"):
        Trace("x", np.array([0.0, 2.0, 1.0]), np.array([0.0, 1.0, 2.0]), 1.0, "steps")
    with pytest.raises(TraceError, match="from 0 to its period"):
        Trace("x", t, c, 2.0, "linear")
    with pytest.raises(TraceError, match="some capacity"):
        Trace("x", t, np.zeros(2), 1.0, "linear")
    with pytest.raises(TraceError):
        constant(0.0)
    with pytest.raises(TraceError):
        on_off(5.0, 0.0, 1.0)


# -------------------------------------------------------------------------------------- specs


def test_parse_spec_const() -> None:
    trace = parse_spec("const:8")
    assert trace.shape == "linear"
    assert trace.mean_mbps == pytest.approx(8.0)
    assert trace.capacity(0.5) == pytest.approx(500_000)


def test_parse_spec_steps() -> None:
    trace = parse_spec("steps:1,5,2.5@0.5")
    assert trace.period_s == pytest.approx(1.5)
    np.testing.assert_allclose(_rates(trace), [1.0, 5.0, 2.5])


def test_parse_spec_walk_matches_random_walk_seed_0() -> None:
    trace = parse_spec("walk:3,0.5@2")
    expected = random_walk(3.0, 0.5, 2.0, 600.0, seed=0)
    assert trace.period_s == pytest.approx(600.0)
    np.testing.assert_array_equal(trace.cum_bytes, expected.cum_bytes)


def test_parse_spec_onoff() -> None:
    trace = parse_spec("onoff:4@2,3")
    assert trace.period_s == pytest.approx(5.0)
    assert trace.capacity(2.0) == pytest.approx(1e6)
    assert trace.capacity(4.9) == pytest.approx(1e6)
    assert trace.time_for(1e6 + 1) == pytest.approx(5.0 + 2e-6)


def test_parse_spec_file_paths(tmp_path: Path) -> None:
    mm = _write(tmp_path, "1\n2\n2\n4\n", "link.up")
    rate = _write(tmp_path, "0 1.5\n1 2.5\n", "rates")
    assert parse_spec(str(mm)).period_bytes == 4 * PACKET_BYTES
    assert parse_spec(str(mm)).shape == "steps"
    assert parse_spec(str(rate)).mean_mbps == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("const:abc", "bad trace spec 'const:abc'"),
        ("const:", "bad trace spec"),
        ("const:-1", ">= 0"),
        ("const:nan", ">= 0"),
        ("const:inf", ">= 0"),
        ("const:1,2", "bad trace spec"),
        ("const:0", "bad trace spec"),
        ("steps:1,2", "VALUES@TIMES"),
        ("steps:1,x@1", "bad trace spec"),
        ("steps:1,2@-1", ">= 0"),
        ("steps:1,2@0", "bad trace spec"),
        ("walk:3@1", "bad trace spec"),
        ("walk:3,-1@1", ">= 0"),
        ("onoff:5@1", "bad trace spec"),
        ("onoff:5@1,-2", ">= 0"),
        ("onoff:-5@1,2", ">= 0"),
        ("onoff:5@0,0", "bad trace spec"),
        ("bogus:1", "no trace file 'bogus:1'"),
        ("const", "no trace file 'const'"),
        ("", "no trace file"),
    ],
)
def test_parse_spec_rejects_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(TraceError, match=match):
        parse_spec(spec)


def test_parse_spec_unknown_names_the_kinds() -> None:
    with pytest.raises(TraceError) as info:
        parse_spec("/no/such/trace")
    for kind in ("const", "steps", "walk", "onoff"):
        assert kind in str(info.value)


def test_parse_spec_walk_zero_step() -> None:
    with pytest.raises(TraceError):
        parse_spec("walk:3,1@0")


# ----------------------------------------------------------------------------------- bad files


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("\n  \n\n", "empty"),
        ("1 2 3\n", "line 1 has 3 fields, not 2"),
        ("0 1\n1 2 3\n", "line 2 has 3 fields, not 2"),
        ("1\n2 3\n", "line 2 has 2 fields, not 1"),
        ("abc\n", "could not convert"),
        ("0 1\n1 fast\n", "could not convert"),
        ("5\n3\n", "non-decreasing whole milliseconds"),
        ("-1\n3\n", "non-decreasing whole milliseconds"),
        ("1.5\n3\n", "non-decreasing whole milliseconds"),
        ("0\n0\n", "after 0 ms"),
        ("0 1\n1 -2\n", "rates must be >= 0"),
        ("0 1\n1 2\n1 3\n", "times must rise"),
        ("1 1\n0 2\n", "times must rise"),
        ("0 1\n1 nan\n", "finite"),
        ("0 0\n1 0\n", "some capacity"),
    ],
)
def test_bad_files_raise_trace_error(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(TraceError, match=match):
        read_trace(path)
    with pytest.raises(TraceError, match=match):
        parse_spec(str(path))


def test_unreadable_files_raise_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path / "missing")
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(tmp_path)  # a directory
    with pytest.raises(TraceError, match="cannot read"):
        read_mahimahi(tmp_path / "missing")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00\x81\n")
    with pytest.raises(TraceError, match="cannot read"):
        read_trace(binary)


def test_read_pair_needs_both_directions(tmp_path: Path) -> None:
    _write(tmp_path, "1\n2\n", "x.up")
    with pytest.raises(TraceError, match=r"x\.down"):
        read_pair(tmp_path / "x")
    _write(tmp_path, "1\n1\n1\n2\n", "x.down")
    pair = read_pair(tmp_path / "x")
    assert (pair.up.period_bytes, pair.down.period_bytes) == (3000, 6000)
    assert math.isclose(pair.down.mean_mbps, 2 * pair.up.mean_mbps)


def test_walk_specs_are_drawn_with_the_seed_given() -> None:
    from tandem.sim.traces import varies_by_seed

    one, other = parse_spec("walk:3,1@0.5", seed=1), parse_spec("walk:3,1@0.5", seed=2)
    np.testing.assert_array_equal(one.cum_bytes, random_walk(3, 1, 0.5, 600.0, 1).cum_bytes)
    assert not np.array_equal(one.cum_bytes, other.cum_bytes)
    assert varies_by_seed("walk:3,1@0.5") and not varies_by_seed("const:3")
