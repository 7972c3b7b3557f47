"""Exactly-once audit of the training data (README, "Fault tolerance and elasticity"). With
`data.id_column` set, the packed rows carry the ids of the documents that start in them, and after
every step each rank reports the ids of the rows it trained on, tagged with its worker group
(attempt).

A step is committed by the last attempt that ran it: a step run again after a restart
replaces what the failed attempt did (that work was never checkpointed). The audit takes,
for every committed step, the rows of every data-parallel rank of that attempt (tensor /
pipeline peers of a dp rank must report the same rows), and lists the document ids in
training order, with any id seen twice and any disagreement between peers."""
from __future__ import annotations

from collections import Counter

from raytune_llama.trainer.run_events import DataEvent, to_record


def data_record(step: int, attempt: float, rank: int, dp_rank: int, doc_ids) -> dict:
    """The progress-board record one rank pushes after a step (doc_ids: its rows' column)."""
    ids = [i for cell in doc_ids for i in str(cell).split(",") if i]
    return to_record(DataEvent(step, attempt, rank, dp_rank, ids))


def data_events(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("event") == DataEvent.kind]


def committed_ids(records: list[dict]) -> tuple[list[tuple[int, list[str]]], list[str]]:
    """([(step, document ids of that committed step in dp-rank order)], problems found)."""
    events = data_events(records)
    last_attempt: dict[int, float] = {}
    for e in events:
        last_attempt[e["step"]] = max(last_attempt.get(e["step"], e["attempt"]), e["attempt"])
    steps, problems = [], []
    for step in sorted(last_attempt):
        ids: list[str] = []
        by_dp: dict[int, list[str]] = {}
        for e in events:
            if e["step"] != step or e["attempt"] != last_attempt[step]:
                continue
            if e["dp_rank"] in by_dp and by_dp[e["dp_rank"]] != e["ids"]:
                problems.append(f"step {step}: rank {e['rank']} trained on other rows than its dp peers")
            by_dp.setdefault(e["dp_rank"], e["ids"])
        if sorted(by_dp) != list(range(len(by_dp))):
            problems.append(f"step {step}: data-parallel ranks {sorted(by_dp)} reported (a rank is missing)")
        for dp_rank in sorted(by_dp):
            ids += by_dp[dp_rank]
        steps.append((step, ids))
    return steps, problems


def audit(records: list[dict]) -> dict | None:
    """Summary of the exactly-once audit, or None when the rows carry no document ids."""
    if not data_events(records):
        return None
    steps, problems = committed_ids(records)
    ids = [i for _, step_ids in steps for i in step_ids]
    twice = sorted(i for i, n in Counter(ids).items() if n > 1)
    return {"documents": len(ids), "distinct": len(set(ids)), "duplicated": twice, "problems": problems,
            "ids": ids, "by_step": [[step, step_ids] for step, step_ids in steps]}
