"""MO-ASHA: the rung rule on hand-made tables, the scheduler's bookkeeping through Tune's hooks, a prior (a warm
start's taken trials) at its rungs, and one real Tune run whose stops are worked out by hand."""

from __future__ import annotations

import math
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
from ray.tune.experiment import Trial

from search.tune.moasha import CONTINUE, STOP, MOASHAScheduler, rung_decision, rung_milestones, rung_prior

MODES = ["max", "min"]                  # (val_acc, latency_ms)


# ---------------------------------------------------------------------------------------------------- the rung rule

# Recorded at a rung, in arrival order. C is dominated by A and B.
A, B, C = (0.90, 5.0), (0.95, 8.0), (0.80, 9.0)


@pytest.mark.parametrize("new, decision, why", [
    ((0.85, 4.0), CONTINUE, "front 0, an extreme (fastest): crowding inf, place 0 of 4 < 2"),
    ((0.79, 9.5), STOP, "dominated by C: front 2, place 3 of 4"),
    ((0.90, 5.0), CONTINUE, "a duplicate of A: same front and distance, the tie goes to the newcomer"),
    ((0.96, 4.0), CONTINUE, "dominates A and B: alone in front 0"),
    ((0.85, 9.0), STOP, "dominated by A: front 1 with C, place 3 of 4"),
])
def test_rung_rule_on_a_hand_made_table(new: tuple[float, float], decision: str, why: str) -> None:
    assert rung_decision([A, B, C], new, MODES, reduction_factor=2) == decision, why


def test_a_non_dominated_trial_can_lose_on_crowding() -> None:
    # All four on front 0. Min-space crowding: B and G are extremes (inf); H = (0.91, 5.5) has
    # (0.95-0.90)/0.10 + (8-5)/4 = 1.25, A = (0.91-0.85)/0.10 + (5.5-4)/4 = 0.975. Order B, G, H, A: H is 3rd of 4.
    g, h = (0.85, 4.0), (0.91, 5.5)
    assert rung_decision([A, B, g], h, MODES, reduction_factor=2) == STOP
    assert rung_decision([A, B, g], h, MODES, reduction_factor=4 / 3) == CONTINUE     # keep 3 of 4


def test_first_at_a_rung_continues_and_one_objective_is_top_share() -> None:
    assert rung_decision([], (0.1, 99.0), MODES, 2) == CONTINUE
    assert rung_decision([A], (0.5, 99.0), MODES, 2) == STOP
    recorded = [(1.0,), (2.0,), (3.0,)]
    assert rung_decision(recorded, (2.5,), ["max"], 2) == CONTINUE                    # 2nd of 4
    assert rung_decision(recorded, (1.5,), ["max"], 2) == STOP                        # 3rd of 4
    assert rung_decision(recorded, (1.5,), ["min"], 2) == CONTINUE
    assert rung_decision(recorded, (float("nan"),), ["max"], 2) == STOP               # NaN is the worst


def test_milestones_are_rays_asha_rungs() -> None:
    assert rung_milestones(1, 2, 3) == [1, 2]
    assert rung_milestones(2, 2.0, 6) == [2, 4]
    assert rung_milestones(1, 3, 27) == [1, 3, 9, 27]


# ---------------------------------------------------------------------------------------------------- the scheduler

def trial(name: str) -> Trial:
    return Trial("fn", trial_id=name, stub=True)


def test_scheduler_knows_cost_from_the_first_epoch_and_waits_for_unknown_objectives() -> None:
    s = MOASHAScheduler([("val_acc", "max"), ("latency_ms", "min")], grace_period=2, reduction_factor=2, max_t=8)
    assert s.milestones == [2, 4, 8]
    t0, t1, t2 = trial("t0"), trial("t1"), trial("t2")
    for t in (t0, t1, t2):
        s.on_trial_add(None, t)                                        # type: ignore[arg-type]
    assert s.on_trial_result(None, t0, {"training_iteration": 1, "val_acc": 0.5, "latency_ms": 2.0}) == CONTINUE
    assert s.on_trial_result(None, t0, {"training_iteration": 2, "val_acc": 0.9}) == CONTINUE
    assert s.rungs[2] == {"t0": (0.9, 2.0)}                            # latency from epoch 1, accuracy from 2
    # t1 reports latency at epoch 1 only and val_acc only from epoch 3: judged at rung 2 by its 3rd result.
    assert s.on_trial_result(None, t1, {"training_iteration": 1, "latency_ms": 3.0}) == CONTINUE
    assert s.on_trial_result(None, t1, {"training_iteration": 2}) == CONTINUE
    assert "t1" not in s.rungs[2]
    assert s.on_trial_result(None, t1, {"training_iteration": 3, "val_acc": 0.8}) == STOP   # dominated by t0
    assert s.rungs[2]["t1"] == (0.8, 3.0) and s.num_stopped == 1
    # A trial that jumps past a rung is judged at the highest rung it reached (Ray's ASHA does the same).
    assert s.on_trial_result(None, t2, {"training_iteration": 4, "val_acc": 0.1, "latency_ms": 9.0}) == CONTINUE
    assert "t2" in s.rungs[4] and "t2" not in s.rungs[2]
    assert s.on_trial_result(None, t0, {"training_iteration": 4, "val_acc": 0.92}) == CONTINUE   # dominates t2
    assert s.on_trial_result(None, t0, {"training_iteration": 8, "val_acc": 0.94}) == STOP       # max_t
    s.on_trial_complete(None, t0, {"training_iteration": 8, "val_acc": 0.94})
    assert s.rungs[8]["t0"] == (0.94, 2.0) and s.num_stopped == 1      # reaching max_t is not an early stop
    s.on_trial_remove(None, t2)                                        # type: ignore[arg-type]
    assert "MO-ASHA" in s.debug_string() and "num_stopped=1" in s.debug_string()


def test_scheduler_state_survives_save_and_restore(tmp_path: Path) -> None:
    s = MOASHAScheduler([("val_acc", "max"), ("params", "min")], max_t=8)
    s.on_trial_result(None, trial("a"), {"training_iteration": 1, "val_acc": 0.5, "params": 10})
    s.save(str(tmp_path / "s.pkl"))
    fresh = MOASHAScheduler([("val_acc", "max"), ("params", "min")], max_t=8)
    fresh.restore(str(tmp_path / "s.pkl"))
    assert fresh.rungs == s.rungs and pickle.loads(pickle.dumps(fresh)).rungs == s.rungs


def test_tunes_metric_must_be_the_first_objective() -> None:
    s = MOASHAScheduler([("val_acc", "max"), ("latency_ms", "min")])
    assert s.set_search_properties(None, None) and s.set_search_properties("val_acc", "max")
    assert not s.set_search_properties("latency_ms", "min") and not s.set_search_properties("val_acc", "min")
    with pytest.raises(ValueError, match="objectives"):
        MOASHAScheduler([("val_acc", "maximize")])
    with pytest.raises(ValueError, match="reduction_factor"):
        MOASHAScheduler([("val_acc", "max")], reduction_factor=1)


# ---------------------------------------------------------------------------------------------------- a prior

def test_one_objective_is_asha_keep_the_top_ceil_n_over_rf() -> None:
    rng = random.Random(0)
    for _ in range(2000):                               # small integers: many ties
        rf, mode = rng.choice([1.5, 2, 3, 4]), rng.choice(["max", "min"])
        recorded = [(float(rng.randint(0, 5)),) for _ in range(rng.randint(0, 7))]
        new = (float(rng.randint(0, 5)),)
        sign = 1 if mode == "max" else -1
        ahead = sum(sign * r[0] > sign * new[0] for r in recorded)        # ties go to the newcomer
        kept = math.ceil((len(recorded) + 1) / rf)
        assert rung_decision(recorded, new, [mode], rf) == (CONTINUE if ahead < kept else STOP), (recorded, new, rf)


@pytest.mark.parametrize("rf", [2, 3])
def test_a_prior_of_three_good_values_stops_a_worse_newcomer_at_the_first_rung(rf: int) -> None:
    prior = {1: [(0.80,), (0.85,), (0.90,)]}           # three taken trials' val_acc at epoch 1
    s = MOASHAScheduler([("val_acc", "max")], grace_period=1, reduction_factor=rf, max_t=9, prior=prior)
    worse, better = trial("worse"), trial("better")
    for t in (worse, better):
        s.on_trial_add(None, t)                                          # type: ignore[arg-type]
    assert s.on_trial_result(None, worse, {"training_iteration": 1, "val_acc": 0.50}) == STOP    # 4th of 4
    assert s.on_trial_result(None, better, {"training_iteration": 1, "val_acc": 0.95}) == CONTINUE
    assert list(s.rungs[1].values()) == [(0.80,), (0.85,), (0.90,), (0.50,), (0.95,)]
    assert s.num_stopped == 1 and "t=1: 5 recorded (3 prior)" in s.debug_string()
    empty = MOASHAScheduler([("val_acc", "max")], grace_period=1, reduction_factor=rf, max_t=9)
    assert empty.on_trial_result(None, worse, {"training_iteration": 1, "val_acc": 0.50}) == CONTINUE   # first


def test_a_prior_survives_save_restore_and_tunes_pickle(tmp_path: Path) -> None:
    prior = {1: [(0.8, 2.0), (0.9, 3.0)], 2: [(0.9, 2.0)]}
    s = MOASHAScheduler([("val_acc", "max"), ("latency_ms", "min")], max_t=4, prior=prior)
    s.save(str(tmp_path / "s.pkl"))
    fresh = MOASHAScheduler([("val_acc", "max"), ("latency_ms", "min")], max_t=4)
    fresh.restore(str(tmp_path / "s.pkl"))
    for restored in (fresh, pickle.loads(pickle.dumps(s))):             # save/restore; tuner.pkl's pickle
        assert restored.rungs == s.rungs and restored.prior_sizes == {1: 2, 2: 1, 4: 0}
        assert restored.on_trial_result(None, trial("new"), {"training_iteration": 1, "val_acc": 0.7,
                                                              "latency_ms": 4.0}) == STOP    # dominated by both


def test_a_prior_must_name_rungs_and_hold_one_value_per_objective() -> None:
    with pytest.raises(ValueError, match=r"prior: \[3\] are not rungs"):
        MOASHAScheduler([("val_acc", "max")], max_t=4, prior={3: [(0.5,)]})
    with pytest.raises(ValueError, match="expected one per objective"):
        MOASHAScheduler([("val_acc", "max"), ("params", "min")], max_t=4, prior={1: [(0.5,)]})


def test_rung_prior_records_each_curve_where_a_live_trial_would_be() -> None:
    milestones = rung_milestones(1, 2, 4)                                # [1, 2, 4]
    curves = [{1: (0.5,), 2: (0.6,), 3: (0.65,), 4: (0.7,)},            # ran to max_t: every rung
              {1: (0.3,)},                                               # stopped after epoch 1: rung 1 only
              {1: (0.4,), 3: (0.55,)},                                   # epoch 2 missing: rung 2 from epoch 3
              {}]
    assert rung_prior(curves, milestones) == {1: [(0.5,), (0.3,), (0.4,)], 2: [(0.6,), (0.55,)], 4: [(0.7,)]}
    assert rung_prior([{1: (0.5,), 2: (0.6,)}], rung_milestones(2, 2, 8)) == {2: [(0.6,)], 4: [], 8: []}


# ---------------------------------------------------------------------------------------------------- real Tune

# One trial at a time, in this order: (val_acc per epoch, latency_ms reported at epoch 1 only). max_t 3, rungs 1, 2.
CURVES: list[tuple[list[float], float]] = [
    ([0.50, 0.60, 0.70], 2.0),    # T0: first at each rung -> runs to max_t (3 epochs)
    ([0.40, 0.90, 0.90], 3.0),    # T1: rung 1 (0.40, 3.0) is dominated by T0's (0.50, 2.0) -> stopped after 1
    ([0.45, 0.65, 0.75], 1.0),    # T2: rung 1 front 0 with T0; rung 2 dominates T0 -> 3 epochs
    ([0.55, 0.50, 0.90], 2.5),    # T3: rung 1 front 0, place 0 of 4; rung 2 (0.50, 2.5) 3rd of 3 -> stopped after 2
]


def _curve_trainable(config: dict[str, Any]) -> None:
    from ray import tune

    accs, latency = CURVES[config["i"]]
    for epoch, acc in enumerate(accs, start=1):
        tune.report({"val_acc": acc, **({"latency_ms": latency} if epoch == 1 else {})})


@pytest.mark.slow
def test_real_tune_run_stops_the_trials_worked_out_by_hand(tmp_path: Path) -> None:
    import ray
    from ray import tune

    scheduler = MOASHAScheduler([("val_acc", "max"), ("latency_ms", "min")], grace_period=1, reduction_factor=2,
                                max_t=3)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(_curve_trainable, param_space={"i": tune.grid_search(list(range(len(CURVES))))},
                           tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=1),
                           run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    epochs = {r.config["i"]: r.metrics["training_iteration"] for r in grid}
    assert epochs == {0: 3, 1: 1, 2: 3, 3: 2}
