#!/usr/bin/env bash
# CI test of scripts/slurm/train.sbatch on a real SLURM (Debian's slurm-wlm + munge) running
# on localhost: one node (this machine's CPUs and memory, from `slurmd -C`), partition `debug`.
#
#   (a) a 2-task CPU job runs the tiny recipe to the end: every step in metrics.jsonl, FINISHED.
#   (b) the same recipe (another output_dir) is preempted with `scontrol requeue JOBID` once its
#       first checkpoint (step-2) is COMPLETE; the requeued job must resume ("resuming from")
#       and end with exactly the losses of (a) (same recipe, seed and 2-rank layout).
#   (c) the same again, but stopped with the time-limit path: `scancel --batch --signal=USR1`
#       (what --signal=B:USR1@300 delivers) -> the batch shell forwards USR1 to the ranks, they
#       checkpoint and exit 0, the script requeues its own job, which resumes and finishes.
#
# Needs root (daemons as root, SlurmUser=root) and apt for the first install. Everything else
# (munge key and socket, slurm.conf, state, spool, logs) lives in a temporary folder; the
# daemons are started in the background (no systemd needed) and stopped on exit, pass or fail.
# Usage: scripts/slurm/ci_test.sh   (from anywhere; builds nothing: needs target/release/dsa-train,
# or DSA_TRAIN_BIN). Environment: DSA_CI_KEEP=1 keeps the temporary folder.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
T0=$SECONDS
STEPS=16            # per job; each step is ~0.3 s on 2 cores with 2 ranks
DEADLINE=$((SECONDS + 480))

say() { echo "[slurm-ci +$((SECONDS - T0))s] $*"; }
W=
fail() {
  echo "[slurm-ci] FAIL: $*"
  if [ -n "$W" ] && [ -d "$W" ]; then
    for f in "$W"/logs/*.out; do [ -f "$f" ] && { echo "----- job log $f"; cat "$f"; }; done
    for f in "$W"/log/slurmctld.log "$W"/log/slurmd.log; do [ -f "$f" ] && { echo "----- $f (last 40 lines)"; tail -n 40 "$f"; }; done
  fi
  echo "slurm CI test: FAIL ($*)"
  exit 1
}

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and runs the SLURM daemons as root)"
BIN=${DSA_TRAIN_BIN:-$ROOT/target/release/dsa-train}
[ -x "$BIN" ] || fail "no $BIN: run cargo build --release first"
# train.sbatch looks for target/release/dsa-train in the submit directory itself; name the
# binary only when that lookup could pick another one (DSA_TRAIN_BIN given, or a CUDA build in
# dist/gpu/, which needs libcuda).
if [ -n "${DSA_TRAIN_BIN:-}" ] || [ -e "$ROOT/dist/gpu/dsa-train" ]; then export DSA_TRAIN_BIN="$BIN"; fi

# --- packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
  || ! command -v munged >/dev/null; then
  say "installing slurm-wlm and munge"
  # No init system here: keep the packages' postinst from trying to start their services.
  policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; } > /tmp/slurm-ci-apt.log 2>&1
  st=$?
  [ "$policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ "$st" != 0 ]; then
    # Only a machine that cannot install the packages (no root, no network) skips the test;
    # every failure after the install fails CI.
    tail -n 30 /tmp/slurm-ci-apt.log
    echo "slurm CI test: SKIPPED: could not install slurm-wlm and munge with apt-get"
    exit 0
  fi
fi

# --- temporary cluster
W=$(mktemp -d /tmp/dsa-slurm-ci.XXXXXX) || fail "mktemp"
chmod 755 "$W"
mkdir -p "$W/munge" "$W/state" "$W/spool" "$W/log" "$W/run" "$W/logs"
chmod 700 "$W/munge"
PIDS=()
cleanup() {
  local st=$?
  if [ -n "${SLURM_CONF:-}" ] && [ -f "$SLURM_CONF" ] && [ ${#PIDS[@]} -ge 2 ]; then
    scancel --full -Q $(squeue -h -o %i 2>/dev/null) >/dev/null 2>&1 || true
    for _ in $(seq 20); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  local p
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do kill "${PIDS[i]}" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 20); do kill -0 "$p" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$p" 2>/dev/null
  done
  if [ "${DSA_CI_KEEP:-0}" = 1 ]; then echo "[slurm-ci] kept $W"; else rm -rf "$W"; fi
  exit "$st"
}
trap cleanup EXIT
trap 'fail "interrupted"' INT TERM

# Free TCP ports for slurmctld and slurmd (a system SLURM may hold 6817/6818).
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { local p; for p in "$@"; do port_free "$p" && { echo "$p"; return; }; done; echo "$1"; }
CTLD_PORT=$(pick_port 17817 27817 37817)
SLURMD_PORT=$(pick_port 17818 27818 37818)

# munge: a private key and socket.
if command -v mungekey >/dev/null; then mungekey -c -f -k "$W/munge/munge.key" 2>/dev/null; fi
[ -s "$W/munge/munge.key" ] || dd if=/dev/urandom of="$W/munge/munge.key" bs=1024 count=1 status=none
chmod 400 "$W/munge/munge.key"
MUNGE_SOCK="$W/munge/munge.socket"
munged -F --force --key-file="$W/munge/munge.key" --socket="$MUNGE_SOCK" --pid-file="$W/munge/munged.pid" \
  --log-file="$W/log/munged.log" --seed-file="$W/munge/munged.seed" > "$W/log/munged.stdout" 2>&1 &
PIDS+=($!)
for _ in $(seq 40); do [ -S "$MUNGE_SOCK" ] && break; sleep 0.25; done
munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1 || { cat "$W/log/munged.stdout" "$W/log/munged.log" 2>/dev/null; fail "munged did not start"; }

# slurm.conf: one node "localhost" with this machine's CPUs and memory.
HW=$(slurmd -C 2>/dev/null | head -n 1 | sed -e 's/^NodeName=[^ ]* *//')
echo "$HW" | grep -q "CPUs=" || fail "slurmd -C printed no hardware line"
export SLURM_CONF="$W/slurm.conf"
cat > "$SLURM_CONF" <<EOF
ClusterName=dsaci
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s; minimum 5).
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/run/slurmctld.pid
SlurmdPidFile=$W/run/slurmd.pid
SlurmctldLogFile=$W/log/slurmctld.log
SlurmdLogFile=$W/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge=600
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=localhost NodeAddr=127.0.0.1 $HW State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
say "slurm.conf: node localhost $HW; ports $CTLD_PORT/$SLURMD_PORT; $W"
slurmctld -D -c -f "$SLURM_CONF" > "$W/log/slurmctld.stdout" 2>&1 &
PIDS+=($!)
slurmd -D -N localhost -f "$SLURM_CONF" > "$W/log/slurmd.stdout" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do
  [ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] && break
  sleep 0.5
done
[ "$(sinfo -h -n localhost -o %T 2>/dev/null)" = idle ] || { cat "$W"/log/*.stdout; fail "the node did not become idle (sinfo: $(sinfo 2>&1 | tail -n 1))"; }
say "SLURM up: $(sinfo -h -o '%P %a %D %T %N %c')"

# --- the tiny model, corpus and recipe (a 4-layer tiny model, sparse stage: lm_loss and indexer_kl)
"$BIN" tiny --output "$W/tiny" > "$W/log/tiny.log" 2>&1 || { cat "$W/log/tiny.log"; fail "dsa-train tiny"; }
RECIPE="$W/tiny-sparse.toml"
cat > "$RECIPE" <<EOF
[run]
output_dir = "$W/unused"
seed = 3
progress = false
[model]
path = "$W/tiny/model"
dtype = "f32"
device = "cpu"
[data]
path = "$W/tiny/tokens.bin"
seq_len = 32
[train]
stage = "sparse"
steps = $STEPS
lr = 1e-2
global_batch_seqs = 4
micro_batch_seqs = 2
warmup_steps = 2
[dsa]
index_topk = 8
index_n_heads = 2
index_head_dim = 32
[checkpoint]
every = 2
keep_last = 0
EOF

submit() { # NAME -> job id; the recipe with run.output_dir=$W/NAME, 2 tasks on the CPU node
  sbatch --parsable -J "ci-$1" -n 2 --ntasks-per-node=2 --gpus-per-node=0 -t 10 -o "$W/logs/%x-%j.out" \
    scripts/slurm/train.sbatch "$RECIPE" --set "run.output_dir=$W/$1" 2> "$W/log/sbatch-$1.err" | cut -d';' -f1
}
job_field() { scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1; }
wait_job() { # JOBID: until COMPLETED (0) or a failed end state (1) or the deadline
  local s
  while [ $SECONDS -lt $DEADLINE ]; do
    s=$(job_field "$1" JobState)
    case "$s" in
      COMPLETED) return 0 ;;
      FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED) say "job $1 ended $s"; return 1 ;;
    esac
    sleep 0.5
  done
  say "job $1 still $(job_field "$1" JobState) at the deadline"
  return 1
}
wait_file() { # PATH: until it exists or the deadline
  while [ $SECONDS -lt $DEADLINE ]; do [ -e "$1" ] && return 0; sleep 0.1; done
  return 1
}
# metrics.jsonl -> "step lm_loss indexer_kl" lines (awk only: no python on a bare CI machine)
losses() {
  awk '{
    s = $0; sub(/.*"step":/, "", s); sub(/[,}].*/, "", s)
    l = $0; if (l ~ /"lm_loss":/) { sub(/.*"lm_loss":/, "", l); sub(/[,}].*/, "", l) } else l = "null"
    k = $0; sub(/.*"indexer_kl":/, "", k); sub(/[,}].*/, "", k)
    print s, l, k
  }' "$1"
}
check_run() { # NAME JOBID: every step 1..STEPS once, FINISHED = STEPS
  local d="$W/$1"
  [ -f "$d/FINISHED" ] || fail "job $2 ($1): no FINISHED in $d"
  [ "$(tr -d '[:space:]' < "$d/FINISHED")" = "$STEPS" ] || fail "job $2 ($1): FINISHED says $(cat "$d/FINISHED"), expected $STEPS"
  [ "$(losses "$d/metrics.jsonl" | awk '{print $1}' | tr '\n' ' ')" = "$(seq -s ' ' 1 "$STEPS") " ] \
    || fail "job $2 ($1): metrics.jsonl steps are [$(losses "$d/metrics.jsonl" | awk '{print $1}' | tr '\n' ' ')], expected 1..$STEPS once each"
}
same_losses() { # NAME JOBID: lm_loss and indexer_kl per step equal to run (a)'s within 1e-6 relative
  local bad
  bad=$(paste -d ' ' <(losses "$W/plain/metrics.jsonl") <(losses "$W/$1/metrics.jsonl") | awk '
    function off(a, b) { d = a - b; if (d < 0) d = -d; m = (a < 0 ? -a : a); if ((b < 0 ? -b : b) > m) m = (b < 0 ? -b : b); return d > 1e-6 * (m > 1e-12 ? m : 1e-12) }
    $1 != $4 || off($2, $5) || off($3, $6) { printf "step %s: lm_loss %s vs %s, indexer_kl %s vs %s; ", $1, $2, $5, $3, $6 }')
  [ -z "$bad" ] || fail "job $2 ($1): losses differ from the uninterrupted run: $bad"
  if cmp -s <(losses "$W/plain/metrics.jsonl") <(losses "$W/$1/metrics.jsonl"); then
    say "job $2 ($1): lm_loss and indexer_kl equal to run (a) at all $STEPS steps (bitwise)"
  else
    say "job $2 ($1): lm_loss and indexer_kl within 1e-6 relative of run (a) at all $STEPS steps"
  fi
}
resumed_from() { grep -o 'resuming from [^ ]* (step [0-9]*)' "$W"/logs/ci-"$1"-"$2".out | tail -n 1; }

# (a) uninterrupted
JA=$(submit plain)
[ -n "$JA" ] || { cat "$W/log/sbatch-plain.err"; fail "sbatch refused job (a)"; }
say "(a) job $JA: 2 tasks, $STEPS steps"
wait_job "$JA" || fail "(a) job $JA did not complete"
check_run plain "$JA"
grep -q "CPU-only node" "$W/logs/ci-plain-$JA.out" || fail "(a) job $JA: the script did not report the CPU backend"
grep -q "binary $BIN\$" "$W/logs/ci-plain-$JA.out" || fail "(a) job $JA: the script did not run $BIN"
say "(a) job $JA: COMPLETED, steps 1..$STEPS in metrics.jsonl, FINISHED = $STEPS"

# (b) preempted with scontrol requeue after its first checkpoint
JB=$(submit requeued)
[ -n "$JB" ] || { cat "$W/log/sbatch-requeued.err"; fail "sbatch refused job (b)"; }
wait_file "$W/requeued/step-2/COMPLETE" || fail "(b) job $JB wrote no step-2 checkpoint"
scontrol requeue "$JB" || fail "(b) scontrol requeue $JB failed"
say "(b) job $JB: step-2 COMPLETE, scontrol requeue $JB"
wait_job "$JB" || fail "(b) job $JB did not complete after the requeue"
[ "$(job_field "$JB" Restarts)" -ge 1 ] 2>/dev/null || fail "(b) job $JB: Restarts=$(job_field "$JB" Restarts), expected >= 1"
R=$(resumed_from requeued "$JB")
[ -n "$R" ] || fail "(b) job $JB: the requeued run did not say 'resuming from'"
check_run requeued "$JB"
same_losses requeued "$JB"
say "(b) job $JB: requeued (Restarts=$(job_field "$JB" Restarts)), $R, first attempt: $(grep -o 'stop requested: checkpoint written at step [0-9]*' "$W/logs/ci-requeued-$JB.out" | head -n 1 || true)"

# (c) the time-limit path: USR1 to the batch shell, which stops the ranks and requeues the job
JC=$(submit usr1)
[ -n "$JC" ] || { cat "$W/log/sbatch-usr1.err"; fail "sbatch refused job (c)"; }
wait_file "$W/usr1/step-2/COMPLETE" || fail "(c) job $JC wrote no step-2 checkpoint"
scancel --batch --signal=USR1 "$JC" || fail "(c) scancel --batch --signal=USR1 $JC failed"
say "(c) job $JC: step-2 COMPLETE, scancel --batch --signal=USR1 $JC"
wait_job "$JC" || fail "(c) job $JC did not complete after the USR1 stop"
grep -q "requeueing job $JC" "$W/logs/ci-usr1-$JC.out" || fail "(c) job $JC: the script did not requeue itself after USR1"
[ "$(job_field "$JC" Restarts)" -ge 1 ] 2>/dev/null || fail "(c) job $JC: Restarts=$(job_field "$JC" Restarts), expected >= 1"
grep -q "stop requested: checkpoint written at step" "$W/logs/ci-usr1-$JC.out" || fail "(c) job $JC: the ranks did not checkpoint on USR1"
R=$(resumed_from usr1 "$JC")
[ -n "$R" ] || fail "(c) job $JC: the requeued run did not say 'resuming from'"
check_run usr1 "$JC"
same_losses usr1 "$JC"
say "(c) job $JC: USR1 -> $(grep -o 'checkpoint written at step [0-9]*' "$W/logs/ci-usr1-$JC.out" | head -n 1) -> requeued itself -> $R"

echo "slurm CI test: PASS in $((SECONDS - T0)) s (2-task job; scontrol requeue and USR1 stops resumed with the uninterrupted losses)"
