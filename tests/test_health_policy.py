"""The health policy: NVIDIA's XID knobs (and their one fix), event-to-unit mapping,
per-unit health with recovery, and how units make up logical devices."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_gpu_plugin._health import (
    IGNORED_XIDS,
    HealthChecks,
    HealthTracker,
    Transition,
    describe_xid,
    gpu_units,
    logical_health,
    mig_units,
    units_for_event,
)
from trio_gpu_plugin._node_model import GpuInfo, MigInfo, NodeModel
from trio_gpu_plugin._nvml import (
    EVENT_DOUBLE_BIT_ECC,
    EVENT_GPU_UNAVAILABLE,
    EVENT_RECOVERY_ACTION,
    EVENT_SINGLE_BIT_ECC,
    EVENT_XID,
    NO_INSTANCE,
)

ALL_EVENTS = EVENT_XID | EVENT_DOUBLE_BIT_ECC | EVENT_GPU_UNAVAILABLE | EVENT_SINGLE_BIT_ECC


def checks(disable: str | None = None, enable: str | None = None) -> HealthChecks:
    env = {}
    if disable is not None:
        env["DP_DISABLE_HEALTHCHECKS"] = disable
    if enable is not None:
        env["DP_ENABLE_HEALTHCHECKS"] = enable
    return HealthChecks.from_env(env)


def counted(hc: HealthChecks, xids: list[int]) -> dict[int, bool]:
    return {xid: hc.counts_xid(xid) for xid in xids}


# --- NVIDIA's filter, case by case as in its health_test.go ---------------------------


@pytest.mark.parametrize(
    "value, disabled",
    [
        ("", set()),
        (",", set()),
        ("not-an-int", set()),
        ("68", {68}),
        ("-68", set()),
        ("68  ", {68}),
        ("68,", {68}),
        (",68", {68}),
        ("68,67", {67, 68}),
        ("68,not-an-int,67", {67, 68}),
    ],
)
def test_disable_list_parsing(value: str, disabled: set[int]) -> None:
    assert checks(disable=value).disabled == disabled


def test_default_ignores_application_error_xids_only() -> None:
    hc = HealthChecks.from_env({})
    assert hc == HealthChecks()
    assert IGNORED_XIDS == {13, 31, 43, 45, 68, 109}
    for xid in IGNORED_XIDS:
        assert not hc.counts_xid(xid)
    assert counted(hc, [11, 48, 79, 94, 555]) == {11: True, 48: True, 79: True, 94: True, 555: True}
    assert hc.checks_dbe and hc.checks_lost and hc.checks_xids
    assert hc.problems == ()


@pytest.mark.parametrize("keyword", ["all", "xids", "ALL", " Xids ", "68,all,67"])
def test_disable_all_or_xids_counts_no_xid(keyword: str) -> None:
    hc = checks(disable=keyword)
    assert counted(hc, [13, 31, 43, 45, 68, 109, 48, 79, 555]) == dict.fromkeys(
        [13, 31, 43, 45, 68, 109, 48, 79, 555], False
    )
    assert not hc.checks_xids


def test_disable_list_adds_to_the_default_ignores() -> None:
    hc = checks(disable="79, 48")
    assert counted(hc, [13, 48, 79, 94]) == {13: False, 48: False, 79: False, 94: True}


def test_enable_all_counts_even_application_errors() -> None:
    hc = checks(enable="all")
    assert counted(hc, [13, 31, 43, 45, 68, 109, 555]) == dict.fromkeys(
        [13, 31, 43, 45, 68, 109, 555], True
    )


def test_enable_overrides_disable() -> None:
    hc = checks(disable="11", enable="11")
    assert counted(hc, [11, 13, 555]) == {11: True, 13: False, 555: True}


def test_enable_overrides_default_ignores() -> None:
    hc = checks(enable="31")
    assert counted(hc, [13, 31, 43, 45, 68, 109, 555]) == {
        13: False, 31: True, 43: False, 45: False, 68: False, 109: False, 555: True
    }


def test_items_are_stripped_lower_cased_and_empty_ones_skipped() -> None:
    hc = checks(disable=" 48 ,, ALL ,", enable="\t79\n,")
    assert hc.disable_all and hc.disabled == {48} and hc.enabled == {79}
    assert hc.problems == ()


def test_bad_items_are_reported_and_ignored() -> None:
    hc = checks(disable="68,not-an-int,-68,+5,1_0,٣,67", enable="xids, Nope ,79")
    assert hc.disabled == {67, 68} and hc.enabled == {79}
    assert not hc.disable_all and not hc.disable_xids and not hc.enable_all
    assert hc.problems == (
        "DP_DISABLE_HEALTHCHECKS: ignoring 'not-an-int' (not an XID number, 'all' or 'xids')",
        "DP_DISABLE_HEALTHCHECKS: ignoring '-68' (not an XID number, 'all' or 'xids')",
        "DP_DISABLE_HEALTHCHECKS: ignoring '+5' (not an XID number, 'all' or 'xids')",
        "DP_DISABLE_HEALTHCHECKS: ignoring '1_0' (not an XID number, 'all' or 'xids')",
        "DP_DISABLE_HEALTHCHECKS: ignoring '٣' (not an XID number, 'all' or 'xids')",
        "DP_ENABLE_HEALTHCHECKS: ignoring 'xids' (not an XID number or 'all')",
        "DP_ENABLE_HEALTHCHECKS: ignoring 'Nope' (not an XID number or 'all')",
    )


def test_xids_wider_than_64_bits_are_malformed() -> None:
    hc = checks(disable=f"{2**64 - 1},{2**64}")
    assert hc.disabled == {2**64 - 1}
    assert len(hc.problems) == 1 and str(2**64) in hc.problems[0]


# --- the fix: DISABLE=all with an ENABLE list monitors exactly that list ------------


def test_disable_all_with_enabled_xids_monitors_only_those() -> None:
    hc = checks(disable="all", enable="79")
    assert counted(hc, [79, 48, 94, 13]) == {79: True, 48: False, 94: False, 13: False}
    assert not hc.checks_dbe and not hc.checks_lost
    assert hc.checks_xids and hc.watches_events and not hc.off
    assert hc.event_mask(ALL_EVENTS) == EVENT_XID


def test_disable_all_is_off() -> None:
    hc = checks(disable="all")
    assert hc.off and not hc.watches_events
    assert not hc.checks_dbe and not hc.checks_lost
    assert hc.event_mask(ALL_EVENTS) == 0


def test_disable_xids_keeps_ecc_and_lost_checks() -> None:
    hc = checks(disable="xids")
    assert hc.checks_dbe and hc.checks_lost and not hc.off
    assert hc.event_mask(ALL_EVENTS) == EVENT_DOUBLE_BIT_ECC | EVENT_GPU_UNAVAILABLE


def test_enable_all_beats_disable_all_for_every_check() -> None:
    hc = checks(disable="all", enable="all")
    assert hc.counts_xid(13) and hc.checks_dbe and hc.checks_lost


def test_the_recovery_action_goes_with_the_default_xid_checks() -> None:
    assert HealthChecks().checks_recovery_action
    assert HealthChecks().event_mask(EVENT_RECOVERY_ACTION) == EVENT_RECOVERY_ACTION
    assert checks(enable="all").checks_recovery_action
    for off in (checks(disable="xids"), checks(disable="all"), checks(disable="all", enable="79")):
        assert not off.checks_recovery_action
        assert off.event_mask(ALL_EVENTS | EVENT_RECOVERY_ACTION) & EVENT_RECOVERY_ACTION == 0


def test_event_mask_is_anded_with_supported_types() -> None:
    hc = HealthChecks()
    assert hc.event_mask(ALL_EVENTS) == EVENT_XID | EVENT_DOUBLE_BIT_ECC | EVENT_GPU_UNAVAILABLE
    assert hc.event_mask(EVENT_XID | EVENT_SINGLE_BIT_ECC) == EVENT_XID
    assert hc.event_mask(EVENT_SINGLE_BIT_ECC) == 0


@pytest.mark.parametrize(
    "disable, enable, line",
    [
        (
            None,
            None,
            "health checks: XIDs except 13, 31, 43, 45, 68, 109; driver recovery action; double-bit ECC; GPU lost",
        ),
        ("all", None, "health checks: off (DP_DISABLE_HEALTHCHECKS=all)"),
        (
            "all",
            "79",
            "health checks: only XIDs 79 (DP_DISABLE_HEALTHCHECKS=all, DP_ENABLE_HEALTHCHECKS=79)",
        ),
        (
            "xids",
            None,
            "health checks: double-bit ECC; GPU lost (DP_DISABLE_HEALTHCHECKS=xids)",
        ),
        (
            "79,48",
            "31",
            "health checks: XIDs except 13, 43, 45, 48, 68, 79, 109; driver recovery action; double-bit ECC; GPU lost"
            " (DP_DISABLE_HEALTHCHECKS=48,79, DP_ENABLE_HEALTHCHECKS=31)",
        ),
        (
            None,
            "all",
            "health checks: all XIDs; driver recovery action; double-bit ECC; GPU lost (DP_ENABLE_HEALTHCHECKS=all)",
        ),
        (
            None,
            "13,31,43,45,68,109",
            "health checks: all XIDs; driver recovery action; double-bit ECC; GPU lost"
            " (DP_ENABLE_HEALTHCHECKS=13,31,43,45,68,109)",
        ),
    ],
)
def test_describe(disable: str | None, enable: str | None, line: str) -> None:
    assert checks(disable, enable).describe() == line


def test_describe_xid() -> None:
    assert describe_xid(79) == "GPU has fallen off the bus"
    assert describe_xid(48) == "double-bit ECC error"
    assert describe_xid(74) == "NVLink error"
    assert describe_xid(94) == "contained ECC error"
    assert describe_xid(95) == "uncontained ECC error"
    for xid in (13, 31, 43, 45, 61, 62, 63, 64, 68, 69, 92, 109, 119, 120, 140):
        assert describe_xid(xid)
    assert describe_xid(99999) == ""


# --- which units an event hits ------------------------------------------------------


def gpu(uuid: str, index: int, migs: tuple[MigInfo, ...] = ()) -> GpuInfo:
    return GpuInfo(
        uuid=uuid, index=index, minor=index, name="NVIDIA A100-SXM4-40GB",
        memory_bytes=40 << 30, pci_bus_id=f"00000000:0{index}:00.0",
        compute_capability=(8, 0), numa_node=0, mig_enabled=bool(migs), mig_devices=migs,
    )


def mig(uuid: str, parent: str, slot: int, gi: int, ci: int) -> MigInfo:
    return MigInfo(
        uuid=uuid, parent_uuid=parent, parent_index=1, index=slot, gi_id=gi, ci_id=ci,
        profile="1g.5gb", memory_bytes=5 << 30, numa_node=0,
    )


MIG_A = mig("MIG-a", "GPU-1", 0, gi=7, ci=0)
MIG_B = mig("MIG-b", "GPU-1", 1, gi=8, ci=0)
# Two compute instances in one GPU instance (a "1c.2g.10gb"-style split).
MIG_C = mig("MIG-c", "GPU-1", 2, gi=3, ci=0)
MIG_D = mig("MIG-d", "GPU-1", 3, gi=3, ci=1)
PLAIN = gpu("GPU-0", 0)
MIGGED = gpu("GPU-1", 1, (MIG_A, MIG_B, MIG_C, MIG_D))
MODEL = NodeModel(gpus=(PLAIN, MIGGED))


def test_event_on_a_gpu_without_mig_hits_the_gpu() -> None:
    assert units_for_event(MODEL, "GPU-0", NO_INSTANCE, NO_INSTANCE) == ("GPU-0",)
    # Instance IDs mean nothing on a GPU without MIG devices.
    assert units_for_event(MODEL, "GPU-0", 1, 0) == ("GPU-0",)


def test_event_without_an_instance_on_a_mig_gpu_hits_the_whole_gpu() -> None:
    whole = ("GPU-1", "MIG-a", "MIG-b", "MIG-c", "MIG-d")
    assert units_for_event(MODEL, "GPU-1", NO_INSTANCE, NO_INSTANCE) == whole
    # NVML sets a compute instance only with its GPU instance: no GI, no attribution.
    assert units_for_event(MODEL, "GPU-1", NO_INSTANCE, 0) == whole


def test_event_on_a_slice_hits_that_slice() -> None:
    assert units_for_event(MODEL, "GPU-1", 8, 0) == ("MIG-b",)
    assert units_for_event(MODEL, "GPU-1", 3, 1) == ("MIG-d",)


def test_event_on_a_gpu_instance_hits_its_slices() -> None:
    assert units_for_event(MODEL, "GPU-1", 3, NO_INSTANCE) == ("MIG-c", "MIG-d")


def test_event_on_an_instance_we_do_not_serve_hits_nothing() -> None:
    assert units_for_event(MODEL, "GPU-1", 9, 0) == ()
    assert units_for_event(MODEL, "GPU-1", 7, 1) == ()
    assert units_for_event(MODEL, "GPU-1", 9, NO_INSTANCE) == ()


def test_event_on_an_unknown_gpu_hits_nothing() -> None:
    assert units_for_event(MODEL, "GPU-elsewhere", NO_INSTANCE, NO_INSTANCE) == ()


# --- the tracker ----------------------------------------------------------------------


def test_mark_transitions_once_and_keeps_the_first_reason() -> None:
    t = HealthTracker(window=60)
    assert t.healthy("GPU-0") and t.reason("GPU-0") is None and t.repeats("GPU-0") == 0
    assert t.mark("GPU-0", "XID 79", now=10) == Transition("GPU-0", False, "XID 79")
    assert t.mark("GPU-0", "XID 48", now=11) is None
    assert t.mark("GPU-0", "NVML probe failed", now=12) is None
    assert not t.healthy("GPU-0")
    assert t.reason("GPU-0") == "XID 79"
    assert t.repeats("GPU-0") == 2
    assert t.unhealthy_units() == {"GPU-0": "XID 79"}
    assert t.healthy("GPU-1")


def test_recovery_exactly_at_the_window_boundary() -> None:
    t = HealthTracker(window=60)
    t.mark("GPU-0", "XID 79", now=100.1)
    due = t.recovery_due("GPU-0")
    assert due == 100.1 + 60
    assert t.probe_ok("GPU-0", now=due - 0.001) is None
    assert t.probe_ok("GPU-0", now=due) == Transition(
        "GPU-0", True, "NVML answers again and no critical event for 60 s"
    )
    assert t.healthy("GPU-0") and t.recovery_due("GPU-0") is None and t.repeats("GPU-0") == 0
    assert t.probe_ok("GPU-0", now=due + 1) is None


def test_each_mark_restarts_the_window() -> None:
    t = HealthTracker(window=60)
    t.mark("GPU-0", "XID 79", now=0)
    t.mark("GPU-0", "XID 79", now=50)
    assert t.recovery_due("GPU-0") == 110
    assert t.probe_ok("GPU-0", now=100) is None
    assert t.probe_ok("GPU-0", now=110) is not None


def test_a_late_stamped_mark_does_not_shorten_the_window() -> None:
    t = HealthTracker(window=60)
    t.mark("GPU-0", "XID 79", now=50)
    t.mark("GPU-0", "XID 79", now=40)
    assert t.recovery_due("GPU-0") == 110


def test_window_zero_never_recovers() -> None:
    t = HealthTracker(window=0)
    t.mark("GPU-0", "XID 79", now=0)
    assert t.recovery_due("GPU-0") is None
    assert t.probe_ok("GPU-0", now=1e12) is None
    assert not t.healthy("GPU-0")


def test_negative_or_nan_window_is_refused() -> None:
    for window in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            HealthTracker(window)


def test_pending_condition_blocks_recovery() -> None:
    t = HealthTracker(window=60)
    t.mark("GPU-0", "XID 63", now=0)
    assert t.probe_ok("GPU-0", now=500, pending="row remap pending") is None
    assert not t.healthy("GPU-0") and t.reason("GPU-0") == "XID 63"
    assert t.probe_ok("GPU-0", now=501) is not None


def test_a_good_probe_of_a_healthy_unit_changes_nothing() -> None:
    t = HealthTracker(window=60)
    assert t.probe_ok("GPU-0", now=0) is None
    assert t.probe_ok("GPU-0", now=0, pending="page retirement pending") is None
    assert t.healthy("GPU-0")


def test_forget_drops_units_that_are_gone() -> None:
    t = HealthTracker(window=60)
    t.mark("MIG-a", "XID 94", now=0)
    t.mark("MIG-b", "XID 94", now=0)
    t.forget(iter(["MIG-b", "GPU-1"]))
    assert t.unhealthy_units() == {"MIG-b": "XID 94"}
    assert t.healthy("MIG-a")


# --- logical devices ------------------------------------------------------------------


def test_units_of_gpus_and_slices() -> None:
    assert gpu_units(PLAIN) == ("GPU-0",)
    assert gpu_units(MIGGED) == ("GPU-1", "MIG-a", "MIG-b", "MIG-c", "MIG-d")
    assert mig_units(MIG_A) == ("MIG-a", "GPU-1")


def test_one_event_marks_every_replica_of_a_gpu() -> None:
    t = HealthTracker(window=60)
    replicas = {f"GPU-0::{i}": gpu_units(PLAIN) for i in range(4)}
    for unit in units_for_event(MODEL, "GPU-0", NO_INSTANCE, NO_INSTANCE):
        t.mark(unit, "XID 79", now=0)
    assert [logical_health(t, units) for units in replicas.values()] == [False] * 4
    assert logical_health(t, gpu_units(MIGGED))


def test_a_bad_slice_makes_its_whole_gpu_unhealthy_but_not_its_siblings() -> None:
    t = HealthTracker(window=60)
    for unit in units_for_event(MODEL, "GPU-1", 8, 0):
        t.mark(unit, "XID 94", now=0)
    assert not logical_health(t, gpu_units(MIGGED))
    assert not logical_health(t, mig_units(MIG_B))
    assert logical_health(t, mig_units(MIG_A))


def test_a_bad_parent_makes_every_slice_unhealthy() -> None:
    t = HealthTracker(window=60)
    t.mark("GPU-1", "GPU lost", now=0)
    assert not any(logical_health(t, mig_units(m)) for m in MIGGED.mig_devices)


# --- property: transitions alternate and agree with healthy() -------------------------

UNITS = ["GPU-0", "GPU-1", "MIG-a"]
operation = st.tuples(
    st.sampled_from(["mark", "probe_ok", "probe_pending"]),
    st.sampled_from(UNITS),
    st.floats(min_value=0, max_value=30, allow_nan=False),
)


@settings(max_examples=200, deadline=None, database=None)
@given(window=st.sampled_from([0.0, 1.0, 10.0]), ops=st.lists(operation, max_size=40))
def test_transitions_alternate_and_agree_with_healthy(
    window: float, ops: list[tuple[str, str, float]]
) -> None:
    t = HealthTracker(window)
    last: dict[str, bool] = {}
    now = 0.0
    for kind, unit, step in ops:
        now += step
        if kind == "mark":
            change = t.mark(unit, "bad", now)
        else:
            change = t.probe_ok(unit, now, "pending" if kind == "probe_pending" else None)
        if change is not None:
            assert change.unit == unit
            assert change.healthy != last.get(unit, True)
            last[unit] = change.healthy
        for u in UNITS:
            assert t.healthy(u) == last.get(u, True)
        assert set(t.unhealthy_units()) == {u for u, ok in last.items() if not ok}
