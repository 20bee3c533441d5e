"""Read a run's TensorBoard events with TensorBoard's own reader and compare them with the
run's metrics.jsonl: the same steps (a resumed run's dropped steps purged) and the same
indexer KL (our scalars are f32). An independent check of src/train/tensorboard.rs.

Usage: python tools/reference/check_tensorboard.py RUN_DIR   (pip install tensorboard)
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = sys.argv[1]
acc = EventAccumulator(run + "/tensorboard", purge_orphaned_data=True)
acc.Reload()
seen = [(e.step, e.value) for e in acc.Scalars("train/indexer_kl")]
with open(run + "/metrics.jsonl") as f:
    want = [(m["step"], m["indexer_kl"]) for m in map(json.loads, f)]
assert [s for s, _ in seen] == [s for s, _ in want], f"steps differ: {seen} vs {want}"
for (s, a), (_, b) in zip(seen, want):
    assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"step {s}: {a} vs {b}"
print(f"OK: {len(seen)} steps, TensorBoard's reader and metrics.jsonl agree")
