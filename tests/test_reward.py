"""The reward sandbox: user code with a time limit per call, in a process that can be killed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlflow.roles.sandbox import Sandbox, call


def test_a_call_past_the_time_limit_is_stopped_and_the_rest_of_the_batch_still_scores():
    sandbox = Sandbox("user_code.reward_hanging_on_eights", timeout_s=1.0)
    try:
        results = sandbox.score(["12", "8 loops", "34", "88", "56"], [{}] * 5)
        assert [r[0] for r in results] == ["ok", "error", "ok", "error", "ok"]
        assert results[1][1] == "timeout" and "ran past reward.timeout_s=1s" in results[1][2]
        assert [r[1] for r in results if r[0] == "ok"] == [1.0, 1.0, 1.0]
        assert sandbox.restarts == 2
        assert sandbox.score(["1"], [{}]) == [("ok", 1.0)]  # a fresh sandbox serves the next batch
    finally:
        sandbox.close()


def test_a_sandbox_shut_while_its_role_scores_launches_no_process_after():
    """The role's exit hook shuts the sandbox from its SIGTERM thread while the main thread scores: the
    main thread's restart after a timeout must not spawn a child that the exiting role leaves half-started."""
    import multiprocessing
    import threading
    import time

    sandbox = Sandbox("user_code.reward_hanging_on_eights", timeout_s=0.5)
    raised: list[BaseException] = []

    def scoring():
        try:
            sandbox.score(["8"] * 50, [{}] * 50)  # every call times out and restarts the sandbox
        except BaseException as e:  # noqa: BLE001 - checked below
            raised.append(e)

    thread = threading.Thread(target=scoring)
    thread.start()
    deadline = time.monotonic() + 60
    while sandbox.restarts < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox.restarts >= 2, "the sandbox never restarted"
    sandbox.shut()
    thread.join(30)
    assert not thread.is_alive()
    assert len(raised) == 1 and "shut while scoring" in str(raised[0])
    assert sandbox.proc is None and not multiprocessing.active_children()
    with pytest.raises(RuntimeError, match="its role is stopping"):
        sandbox.launch()


def test_a_function_that_kills_its_interpreter_costs_one_sample_not_the_role():
    sandbox = Sandbox("user_code.reward_exiting_on_nines", timeout_s=30.0)
    try:
        results = sandbox.score(["1", "9", "2"], [{}] * 3)
        assert [r[0] for r in results] == ["ok", "error", "ok"]
        assert results[1][1] == "process died" and "(exit code 3)" in results[1][2]
    finally:
        sandbox.close()


def test_an_exception_is_an_error_result_and_needs_no_restart():
    sandbox = Sandbox("user_code.reward_raising_on_sevens", timeout_s=30.0)
    try:
        results = sandbox.score(["123", "777"], [{"expected": "123"}, {"expected": "321"}])
        assert results[0] == ("ok", 1.0) and results[1][0] == "error"
        assert results[1][1].startswith("ArithmeticError at user_code.py:")
        assert "raised ArithmeticError: sevens are not allowed" in results[1][2] and "raise ArithmeticError" in results[1][3]
        assert sandbox.restarts == 0 and not math.isnan(results[0][1])
    finally:
        sandbox.close()


@pytest.mark.parametrize("value,kind,said", [
    (None, "returned NoneType", "returned NoneType None: a reward function must return a number"),
    ("1.0", "returned str", "returned str '1.0'"),
    (float("nan"), "returned nan", "a reward must be a finite number"),
    (float("inf"), "returned inf", "a reward must be a finite number"),
    ([1.0], "returned list", "returned list [1.0]"),
])
def test_a_reward_that_is_not_a_finite_number_is_an_error_naming_its_type_never_converted(value, kind, said):
    result = call(lambda response, **_: value, "x", {})
    assert result[:2] == ("error", kind) and said in result[2]


@pytest.mark.parametrize("value", [1, 0.25, True, np.float32(0.5), np.int64(2)])
def test_ints_floats_bools_and_numpy_scalars_are_rewards(value):
    assert call(lambda response, **_: value, "x", {}) == ("ok", float(value))


def test_a_recipe_path_from_before_the_rlflow_package_is_refused_with_the_path_it_moved_to():
    from rlflow.plugins import load_object
    from rlflow.tasks.rewards import math_answer

    with pytest.raises(ValueError, match=r"use reward\.fn=rlflow\.tasks\.rewards\.math_answer"):
        load_object("roles.rewards.math_answer", "reward.fn")
    assert load_object("rlflow.tasks.rewards.math_answer", "reward.fn") is math_answer
