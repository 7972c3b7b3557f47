"""The exactly-once audit on the driver: a step re-run after a restart replaces the failed
attempt's rows; peers of a dp rank must agree; ids seen twice are listed."""
from raytune_llama.trainer.data_audit import audit, data_record
from raytune_llama.trainer.run_events import step_records


def _step(step, attempt, world, ids_per_dp):
    return [data_record(step, attempt, rank, rank % len(ids_per_dp), [",".join(ids_per_dp[rank % len(ids_per_dp)])])
            for rank in range(world)]


def test_rerun_steps_replace_the_failed_attempt_even_at_another_world_size():
    records = (_step(1, 1.0, 2, [["a"], ["b"]]) + _step(2, 1.0, 2, [["c"], ["d"]])
               + _step(3, 1.0, 2, [["e"], ["f"]])  # attempt 1 dies after step 3 (checkpoint at 2)
               + _step(3, 2.0, 1, [["e", "f"]]) + _step(4, 2.0, 1, [["g", "h"]]))
    result = audit(records)
    assert result["ids"] == list("abcdefgh") and result["duplicated"] == [] and result["problems"] == []
    assert result["by_step"][2] == [3, ["e", "f"]]
    assert step_records(records) == []  # audit records are not step records


def test_duplicates_missing_ranks_and_disagreeing_peers_are_reported():
    records = _step(1, 1.0, 2, [["a"], ["a"]]) + [data_record(2, 1.0, 1, 1, ["z"])]
    records.append(data_record(1, 1.0, 3, 0, ["other"]))  # a tp peer of dp rank 0 with other rows
    result = audit(records)
    assert result["duplicated"] == ["a"]
    assert any("step 1: rank 3" in p for p in result["problems"])
    assert any("step 2" in p and "missing" in p for p in result["problems"])
    assert audit([{"step": 1, "loss": 1.0}]) is None
