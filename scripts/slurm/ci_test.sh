#!/usr/bin/env bash
# CI: a real SLURM on localhost (Debian's slurm-wlm and munge), the small CPU recipe submitted
# with 2 tasks through scripts/slurm/train.sbatch; then a second job preempted mid-run with
# `scontrol requeue`, which must resume from its checkpoint and end with the same losses as the
# uninterrupted job. Needs root and apt (installs the packages when missing). Exit 0 = PASS.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$(pwd)"
BIN="$ROOT/target/release/dsa-train"
[ -x "$BIN" ] || cargo build --release
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  if ! { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }; then
    # Only a machine that cannot install the packages (no root, no network) skips the test.
    echo "slurm CI test: SKIPPED: could not install slurm-wlm and munge with apt-get"
    exit 0
  fi
fi
WORK="$(mktemp -d /tmp/dsa-slurm-ci.XXXXXX)"
chmod 755 "$WORK"
PIDS=()
cleanup() {
  scancel --user=root >/dev/null 2>&1 || true
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "slurm CI test: FAIL: $*"; for f in "$WORK"/*.out "$WORK"/slurmctld.log "$WORK"/slurmd.log; do [ -f "$f" ] && { echo "--- $f"; tail -30 "$f"; }; done; exit 1; }

# munge with a private key and socket.
mkdir -p "$WORK/munge" && chmod 700 "$WORK/munge"
dd if=/dev/urandom of="$WORK/munge/munge.key" bs=1024 count=1 status=none && chmod 400 "$WORK/munge/munge.key"
munged --force -f --key-file="$WORK/munge/munge.key" --socket="$WORK/munge/sock" \
  --pid-file="$WORK/munge/pid" --log-file="$WORK/munge/log" --seed-file="$WORK/munge/seed" &
PIDS+=($!)
export MUNGE_SOCKET="$WORK/munge/sock"  # read by nothing below but kept for debugging
HOST="$(hostname -s)"
NODE="$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //; s/ UpTime.*//')"
cat > "$WORK/slurm.conf" <<CONF
ClusterName=dsaci
SlurmctldHost=$HOST
AuthType=auth/munge
AuthInfo=socket=$WORK/munge/sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/slurmctld.log
SlurmdLogFile=$WORK/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
SchedulerType=sched/builtin
NodeName=$HOST $NODE State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
mkdir -p "$WORK/state" "$WORK/spool"
export SLURM_CONF="$WORK/slurm.conf"
slurmctld -D -f "$SLURM_CONF" > "$WORK/slurmctld.stdout" 2>&1 &
PIDS+=($!)
slurmd -D -f "$SLURM_CONF" > "$WORK/slurmd.stdout" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
  sinfo -h -o %T 2>/dev/null | grep -qE "idle|mixed" && break
  sleep 1
done
sinfo -h -o %T | grep -qE "idle|mixed" || fail "the node did not come up"

# The tiny model and corpus, and a 2-rank CPU recipe.
"$BIN" tiny --output "$WORK/tiny" >/dev/null 2>&1 || fail "dsa-train tiny"
recipe() { # NAME STEPS
  cat > "$WORK/$1.toml" <<TOML
[run]
output_dir = "$WORK/$1"
seed = 3
progress = false
[model]
path = "$WORK/tiny/model"
dtype = "f32"
device = "cpu"
index_n_heads = 2
index_head_dim = 32
[data]
path = "$WORK/tiny/tokens.bin"
seq_len = 64
[train]
stage = "warmup"
steps = $2
lr = 1e-2
global_batch_seqs = 4
micro_batch_seqs = 2
[dsa]
index_topk = 16
[checkpoint]
every = 2
keep_last = 0
TOML
}
submit() { # NAME -> job id
  sbatch --parsable -n 2 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 -t 10 \
    -o "$WORK/$1-%j.out" --export=ALL,DSA_TRAIN_BIN="$BIN" -D "$ROOT" scripts/slurm/train.sbatch "$WORK/$1.toml"
}
wait_done() { # JOBID SECONDS
  for _ in $(seq "$2"); do
    state="$(scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
    case "$state" in COMPLETED) return 0 ;; FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) return 1 ;; esac
    sleep 1
  done
  return 1
}
losses() { python3 -c 'import json,sys; [print(m["step"], m["indexer_kl"]) for m in map(json.loads, open(sys.argv[1]))]' "$1"; }

# (a) A plain 2-task job.
recipe plain 6
job="$(submit plain)" || fail "sbatch refused the job"
wait_done "$job" 300 || fail "job $job did not complete"
[ -f "$WORK/plain/FINISHED" ] || fail "no FINISHED after job $job"
[ "$(losses "$WORK/plain/metrics.jsonl" | wc -l)" = 6 ] || fail "metrics.jsonl lacks steps"

# (b) Preempted mid-run, requeued, resumed: same losses as an uninterrupted run.
recipe straight 12
recipe preempted 12
job="$(submit straight)" && wait_done "$job" 300 || fail "the uninterrupted job failed"
job="$(submit preempted)"
for _ in $(seq 300); do [ -f "$WORK/preempted/step-4/COMPLETE" ] && break; sleep 0.5; done
[ -f "$WORK/preempted/step-4/COMPLETE" ] || fail "job $job wrote no checkpoint"
scontrol requeue "$job" || fail "scontrol requeue $job"
wait_done "$job" 400 || fail "the requeued job $job did not complete"
grep -q "resuming from" "$WORK"/preempted-*.out || fail "the requeued job did not resume"
diff <(losses "$WORK/straight/metrics.jsonl") <(losses "$WORK/preempted/metrics.jsonl") >/dev/null \
  || fail "losses differ after the requeue"
echo "slurm CI test: PASS (2-task job; preempted job requeued, resumed and matched the uninterrupted losses)"
