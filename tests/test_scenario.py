"""Scenario files: validation, building devices and strategies, paths, the shipped examples."""

from __future__ import annotations

import copy
import math
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tandem.sim.des import simulate
from tandem.sim.profiles import DEVICE_CLASSES, BundleProfile
from tandem.sim.scenario import (
    PROFILES_DIR,
    build,
    load_scenario,
    open_scenario,
    parse_scenario,
    shipped_scenarios,
)

PROFILE = BundleProfile.load(PROFILES_DIR / "mnist-host.json")
BASE: dict[str, Any] = {
    "name": "test",
    "profile": "mnist-host",
    "devices": [
        {"count": 2, "class": "host", "uplink": "const:5", "downlink": "const:10"},
        {
            "count": 3, "class": "rpi4", "uplink": "walk:2,0.5@1", "downlink": "const:4",
            "delay_ms": 40, "fps": 5, "arrivals": "poisson",
        },
    ],
    "cloud": {"workers": 2, "max_batch": 8, "max_delay_ms": 5},
    "split": {"width": 0.5, "bits": 4},
    "slo_ms": 80,
    "duration_s": 3,
    "seed": 7,
}  # fmt: skip


def _write(directory: Path, data: object, name: str = "scenario.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data))
    return path


def _changed(path: str, value: object) -> dict[str, Any]:
    """BASE with the dotted ``path`` set to ``value`` (or removed when value is ...)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return data


def test_defaults_fill_what_a_scenario_leaves_out() -> None:
    minimal = {
        "name": "m",
        "profile": "mnist-host",
        "devices": [{"count": 1, "class": "host", "uplink": "const:1", "downlink": "const:1"}],
        "strategies": ["local"],
    }
    s = parse_scenario(minimal)
    group = s.devices[0]
    assert (group.delay_ms, group.fps, group.arrivals) == (20.0, 10.0, "periodic")
    assert (s.cloud.workers, s.cloud.max_batch, s.cloud.max_delay_ms) == (1, 32, 2.0)
    assert (s.slo_ms, s.duration_s, s.seed, s.split) == (100.0, 60.0, 0, None)


def test_build_gives_each_group_its_devices_and_the_cloud_its_settings(tmp_path: Path) -> None:
    setup = open_scenario(_write(tmp_path, BASE))
    devices = setup.devices
    assert len(devices) == 5
    assert [d.seed for d in devices] == [7, 8, 9, 10, 11]
    host, rpi = devices[0], devices[2]
    assert host.profile.full_ms == pytest.approx(PROFILE.full_ms)
    factor = DEVICE_CLASSES["rpi4"].factor
    assert rpi.profile.full_ms == pytest.approx(PROFILE.full_ms * factor)
    assert rpi.profile.head_ms[0.5] == pytest.approx(PROFILE.head_ms[0.5] * factor)
    assert (host.delay_ms, host.fps, host.poisson) == (20.0, 10.0, False)
    assert (rpi.delay_ms, rpi.fps, rpi.poisson) == (40.0, 5.0, True)
    assert host.up.mean_mbps == pytest.approx(5.0)
    assert rpi.down.mean_mbps == pytest.approx(4.0)
    assert rpi.up.name.startswith("walk-2")
    cloud = setup.cloud
    assert (cloud.workers, cloud.max_batch, cloud.max_delay_ms) == (2, 8, 5.0)
    assert cloud.full.per_input_ms == pytest.approx(PROFILE.full_batch.per_input_ms)


def test_strategies_carry_the_profiles_sizes_and_accuracies(tmp_path: Path) -> None:
    strategies = open_scenario(_write(tmp_path, BASE)).strategies
    assert list(strategies) == ["local", "offload-raw", "offload-png", "split", "adaptive"]
    local, raw, png = strategies["local"], strategies["offload-raw"], strategies["offload-png"]
    # Each remote request: its payload, the protobuf around it and the calibrated framing.
    wire = PROFILE.request_overhead_bytes + PROFILE.frame_overhead_bytes
    assert (local.kind, local.accuracy) == ("local", PROFILE.full_accuracy)
    assert raw.kind == "offload"
    assert raw.up_bytes == pytest.approx(PROFILE.input_bytes + wire)
    assert png.up_bytes == pytest.approx(PROFILE.png_bytes + wire)
    row = next(r for r in PROFILE.table if r.width == 0.5 and r.bits == 4)
    split = strategies["split"]
    assert (split.kind, split.width, split.accuracy) == ("split", 0.5, row.accuracy)
    assert split.up_bytes == pytest.approx(row.bytes_per_sample + wire)
    adaptive = strategies["adaptive"]
    assert (adaptive.kind, adaptive.slo_ms) == ("adaptive", 80.0)
    assert len(adaptive.table) == len(PROFILE.table)
    sizes = [r.bytes_per_sample + wire for r in PROFILE.table]
    assert [r["bytes_per_sample"] for r in adaptive.table] == pytest.approx(sizes)


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("colour", "blue", "colour: Extra inputs are not permitted"),
        ("devices.0.speed", 3, "devices.0.speed: Extra inputs are not permitted"),
        ("devices.0.class", "pi5", "devices.0.class: unknown device class 'pi5'; choose from"),
        ("devices.1.arrivals", "bursty", "devices.1.arrivals: Input should be 'periodic'"),
        ("devices.0.count", 0, "devices.0.count: Input should be greater than or equal to 1"),
        ("devices", [], "devices: List should have at least 1 item"),
        ("strategies", ["local", "teleport"], "strategies.1: Input should be 'local'"),
        ("strategies", ["local", "local"], "strategies: Value error, each strategy at most"),
        ("split", ..., "split: {width, bits or point} is required when strategies include 'split'"),
        ("split.bits", 4.5, "split.bits: Input should be a valid integer"),
        ("duration_s", math.inf, "duration_s: Input should be a finite number"),
        ("slo_ms", 0, "slo_ms: Input should be greater than 0"),
        ("name", ..., "name: Field required"),
    ],
)
def test_invalid_scenarios_name_the_field(
    tmp_path: Path, path: str, value: object, expected: str
) -> None:
    scenario = _write(tmp_path, _changed(path, value))
    with pytest.raises(ValueError) as info:
        load_scenario(scenario)
    message = str(info.value).replace("Value error, ", "")
    assert message.startswith(f"invalid scenario {scenario}: ")
    assert expected.replace("Value error, ", "") in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        ("profile", "no-such-profile", "profile: 'no-such-profile' is neither a shipped"),
        ("split.width", 0.3, "split: width 0.3, bits 4 is not a row of profile mnist's table"),
        ("split.bits", 3, "split: width 0.5, bits 3 is not a row"),
        ("devices.1.uplink", "walk:2", "devices.1.uplink: bad trace spec 'walk:2'"),
        ("devices.0.uplink", "const:0", "devices.0.uplink: bad trace spec 'const:0'"),
        ("devices.0.downlink", "missing.txt", "devices.0.downlink: no trace file 'missing.txt'"),
    ],
)
def test_scenarios_that_cannot_be_built_name_the_field(
    tmp_path: Path, path: str, value: object, expected: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(expected)):
        open_scenario(_write(tmp_path, _changed(path, value)))


def test_a_missing_split_point_says_when_the_default_strategies_need_it() -> None:
    data = _changed("split", ...)  # BASE lists no strategies: all five, split included
    with pytest.raises(ValueError, match=r"include 'split' \(the default strategies do\)$"):
        parse_scenario(data)
    with pytest.raises(ValueError, match=r"include 'split'$"):
        parse_scenario({**data, "strategies": ["local", "split"]})
    assert parse_scenario({**data, "strategies": ["local", "adaptive"]}).split is None


def test_yaml_tags_cannot_construct_objects_or_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f'!!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(ValueError, match="not valid YAML: could not determine a constructor"):
        load_scenario(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- just\n- a list\n", "a scenario is a YAML mapping"),
        ("", "a scenario is a YAML mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_files_that_are_not_scenarios(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=expected) as info:
        load_scenario(path)
    assert "\n" not in str(info.value)


def test_trace_and_profile_paths_are_relative_to_the_scenario(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "scenarios"
    (home / "traces").mkdir(parents=True)
    # A rate trace: 2 Mbit/s for a second, then 6 Mbit/s for a second: 4 Mbit/s on average.
    (home / "traces" / "up.txt").write_text("0 2\n1 6\n")
    shutil.copy(PROFILES_DIR / "mnist-host.json", home / "my-profile.json")
    data = _changed("devices.0.uplink", "traces/up.txt")
    data["profile"] = "my-profile.json"
    scenario = _write(home, data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    setup = open_scenario(Path("..") / "scenarios" / scenario.name)
    assert setup.devices[0].up.name == "up.txt"
    assert setup.devices[0].up.mean_mbps == pytest.approx(4.0)
    assert setup.profile == PROFILE
    with pytest.raises(ValueError, match=r"profile: 'my-profile\.json' is neither"):
        build(setup.scenario, elsewhere)
    shipped = setup.scenario.model_copy(update={"profile": "mnist-host"})
    with pytest.raises(ValueError, match=r"devices\.0\.uplink: no trace file"):
        build(shipped, elsewhere)


ROOT = Path(__file__).resolve().parents[1]
SHARED_TRACES = "../../../shared/traces/"  # from sim/scenarios: ../shared beside the repository


def test_every_shipped_scenario_loads_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shipped scenarios run from anywhere, and need nothing outside the package, except those
    over the shared measured traces: they read nothing else from ../shared, name it from
    their own directory, and are skipped only where it is absent."""
    monkeypatch.chdir(tmp_path)  # not the repository root: paths must not depend on it
    paths = shipped_scenarios()
    assert {"lte-camera", "fleet-rpi4", "outages", "imagenet-resnet50-rpi4"} <= {
        p.stem for p in paths
    }
    for path in paths:
        text = path.read_text()
        shared = re.findall(r"\S*shared/\S*", text)
        assert all(s.startswith(SHARED_TRACES) for s in shared), (path.name, shared)
        if shared and not (path.parent / SHARED_TRACES).is_dir():
            continue
        setup = open_scenario(path)
        assert setup.scenario.name == path.stem
        for name, strategy in setup.strategies.items():
            outcome = simulate(setup.devices, setup.cloud, strategy, 2.0)
            assert len(outcome.latency_s) > 0, (path.name, name)
            assert np.all(np.isfinite(outcome.latency_s)) and np.all(outcome.latency_s > 0)


def test_random_walk_links_fade_independently_per_device(tmp_path: Path) -> None:
    setup = open_scenario(_write(tmp_path, BASE))
    walkers = setup.devices[2:]  # the rpi4 group's uplink is a random walk
    ups = [d.up.cum_bytes for d in walkers]
    assert not np.array_equal(ups[0], ups[1]) and not np.array_equal(ups[1], ups[2])
    again = open_scenario(_write(tmp_path, BASE, "again.yaml"))
    np.testing.assert_array_equal(again.devices[3].up.cum_bytes, ups[1])  # seeded
    # Fixed-rate links do not depend on the seed: the group's devices share one trace.
    assert setup.devices[0].up is setup.devices[1].up


def test_a_scenario_where_no_input_arrives_is_rejected(tmp_path: Path) -> None:
    data = _changed("devices.0.fps", 0.1)  # one input per 10 s, over a 3 s scenario
    with pytest.raises(ValueError, match=r"devices\.0: fps x duration_s is below 1"):
        open_scenario(_write(tmp_path, data))


def _entropy_profile(directory: Path) -> Path:
    """The shipped profile with its rate point 0 at width 0.25 made smaller and more accurate
    than any other row, and 30 bytes of framing; written where a scenario finds it."""
    from tandem.sim.profiles import TableRow

    best = max(r.accuracy for r in PROFILE.table)
    row = TableRow(width=0.25, point=0, accuracy=best + 0.001, bytes_per_sample=20.0)
    others = [r for r in PROFILE.table if (r.width, r.point) != (0.25, 0)]
    profile = PROFILE.model_copy(update={"table": [*others, row], "frame_overhead_bytes": 30.0})
    path = directory / "entropy-profile.json"
    profile.save(path)
    return path


def test_a_rate_point_is_a_split_point_and_the_framing_crosses_the_link(tmp_path: Path) -> None:
    """``split: {width, point}`` names a rate point's row; every remote strategy sends its
    payload, the protobuf envelope and the profile's HTTP/2 and gRPC framing."""
    profile = BundleProfile.load(_entropy_profile(tmp_path))
    data = {**BASE, "profile": str(tmp_path / "entropy-profile.json"),
            "split": {"width": 0.25, "point": 0}}  # fmt: skip
    strategies = open_scenario(_write(tmp_path, data)).strategies
    wire = profile.request_overhead_bytes + 30.0
    assert strategies["split"].up_bytes == pytest.approx(20.0 + wire)
    assert strategies["offload-raw"].up_bytes == pytest.approx(profile.input_bytes + wire)
    adaptive = strategies["adaptive"].table
    assert {"codec": "entropy", "point": 0, "bits": None}.items() <= adaptive[-1].items()
    assert adaptive[-1]["bytes_per_sample"] == pytest.approx(20.0 + wire)


def test_the_adaptive_policy_sends_a_rate_point_when_it_is_the_best_choice(
    tmp_path: Path,
) -> None:
    """Over a slow uplink the simulated daemon's policy takes the rate point (the most
    accurate option that fits), and the bytes it sends are that row's."""
    data = {**BASE, "profile": str(_entropy_profile(tmp_path)),
            "strategies": ["adaptive"], "slo_ms": 200,
            "devices": [{"count": 1, "class": "host", "uplink": "const:0.05",
                         "downlink": "const:10"}]}  # fmt: skip
    setup = build(parse_scenario(data, "slow"), tmp_path)
    strategy = setup.strategies["adaptive"]
    out = simulate(setup.devices, setup.cloud, strategy, 3.0)
    sent = out.up_bytes[~out.local]
    assert len(sent) > 0
    assert set(np.round(sent, 3)) == {round(strategy.table[-1]["bytes_per_sample"], 3)}
