#!/usr/bin/env bash
# benchmarks/gpu_check.sh    (from a fresh checkout: creates .venv with `make install`)
#
# The GPU paths on a machine with an NVIDIA GPU: the CUDA tests (`pytest -m gpu`, none may
# skip), then through the CLI a short training on the GPU (Ray Train workers with
# resources.gpus_per_worker), a forget whose retrained shard must equal, bit for bit, that
# shard trained from scratch on the GPU without the deleted owner, and serving on GPU
# replicas (serving.gpus_per_replica) answering one prediction; then the same for an S3T
# run (its orders trained on the GPU, a forget by deactivation whose serving stages must
# equal, bit for bit, that order retrained on the GPU without the owner, and serving).
# Prints each step; exits non-zero on any failure. On a machine without a usable GPU it
# says so, runs the device unit tests on CPU (the CUDA ones skip with their reason) and
# exits 0.
#
# PY=/path/to/python skips `make install` and uses that interpreter (its environment must
# have the project installed). GPU_CHECK_PORT (default 18571) is the serving port.
# GPU_CHECK_CPU_FLOW=1 on a machine without a GPU runs steps 2-7 on CPU instead (device cpu,
# no GPUs requested): a dry run of the script itself. GPU_CHECK_ONLY=s3t skips steps 2-4
# (SISA) and runs step 1 and the S3T steps 5-7.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[gpu_check] %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

if [ -z "${PY:-}" ]; then
  make install >&2 || fail "make install"
  PY=.venv/bin/python
fi
CLI=("$PY" -m ray_unlearn.cli)
PORT=${GPU_CHECK_PORT:-18571}

say "python: $("$PY" -c 'import sys; print(sys.version.split()[0])'), $("$PY" -c 'import torch; print("torch", torch.__version__, "cuda build", torch.version.cuda)')"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    say "nvidia-smi is present but torch sees no GPU (a CPU-only torch build?)"
  fi
  say "no usable CUDA GPU on this machine: running the CPU path of the device tests"
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/platform/core/test_device.py \
    tests/platform/methods/s3t/test_s3t_device.py >&2
  if [ "${GPU_CHECK_CPU_FLOW:-0}" != 1 ]; then
    say "done (no GPU: nothing GPU-specific was checked)"
    exit 0
  fi
  say "GPU_CHECK_CPU_FLOW=1: steps 2-7 on CPU (a dry run of this script, not a GPU check)"
  SETTINGS=(training.device=cpu)
  ON_CUDA=0
else
  say "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count())')"
  SETTINGS=(training.device=cuda resources.gpus_per_worker=0.25 serving.gpus_per_replica=0.25)
  ON_CUDA=1
fi

LOG=$(mktemp)
if [ "$ON_CUDA" = 1 ]; then
  # 1. the CUDA tests: bitwise retrain == scratch on CUDA, determinism flags, snapshots on CPU
  say "step 1: pytest -m gpu"
  "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests 2>&1 | tee "$LOG" >&2 || fail "CUDA tests"
  if grep -Eq '[0-9]+ skipped' "$LOG"; then fail "CUDA tests skipped on a GPU machine"; fi
  grep -Eq '[0-9]+ passed' "$LOG" || fail "no CUDA test ran"
fi

STORE=$(mktemp -d)
SERVER=""
cleanup() {
  if [ -n "$SERVER" ] && kill -0 "$SERVER" 2>/dev/null; then
    kill -TERM "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  rm -rf "$STORE" "$LOG"
}
trap cleanup EXIT

run_id() { "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d["run_id"])' "$1"; }
# every version of every shard says, in its manifest metrics, that it trained where asked
trained_where_asked() {
  "$PY" - "$STORE" "$1" "$ON_CUDA" <<'PY'
import sys
from ray_unlearn.platform.core.run import open_run
ctx = open_run(sys.argv[1], sys.argv[2])
reg = ctx.model_store.registry()
on_gpu = [ctx.model_store.manifest(v)["metrics"].get("cuda") for e in reg.shards.values() for v in e.chain]
print(f"[gpu_check]   run {ctx.run_id}: {len(on_gpu)} versions, on CUDA: {sum(x == 1.0 for x in on_gpu)}", file=sys.stderr)
sys.exit(0 if on_gpu and all(x == float(sys.argv[3]) for x in on_gpu) else 1)
PY
}

# serve run $1 on port $2 (serving.gpus_per_replica from its config), one /v1/predict, stop
serve_one() {
  "${CLI[@]}" serve --run "$1" --storage "$STORE" --port "$2" >"$STORE/serve-$1.json" 2>"$STORE/serve-$1.log" &
  SERVER=$!
  "$PY" - "$STORE" "$1" "$2" "$SERVER" <<'PY' || { tail -n 30 "$STORE/serve-$1.log" >&2; return 1; }
import json, os, sys, time, urllib.request
from ray_unlearn.platform.core.run import open_run
store, rid, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
deadline = time.time() + 240
while True:
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=2)
        break
    except OSError:
        os.kill(pid, 0)  # the server died: fail now
        if time.time() > deadline:
            raise SystemExit("server not up within 240 s")
        time.sleep(2)
ctx = open_run(store, rid)
test = ctx.split_records("test")
body = json.dumps({"instances": test.features[:4].tolist()}).encode()
req = urllib.request.Request(f"{base}/v1/predict", body, {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=60))
preds = out["predictions"]
print(f"[gpu_check]   /v1/predict answered {len(preds)} instances; labels "
      f"{[p.get('label') for p in preds]} (true {test.labels[:4].tolist()})", file=sys.stderr)
PY
  kill -TERM "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  SERVER=""
}


if [ "${GPU_CHECK_ONLY:-}" != s3t ]; then
# 2. train on the GPU: 4 Ray Train workers sharing it (0.25 each)
say "step 2: ray-unlearn train (digits, 4 shards, 5 epochs; ${SETTINGS[*]})"
"${CLI[@]}" train --config configs/digits.yaml --storage "$STORE" --json \
  "${SETTINGS[@]}" training.epochs=5 >"$STORE/train.json" || fail "train"
RID=$(run_id "$STORE/train.json")
trained_where_asked "$RID" || fail "training did not run where asked"

# 3. forget one owner of shard 0; the retrained shard must equal scratch training on the GPU
OWNER=$("$PY" -c 'import sys, pyarrow.parquet as pq, pyarrow.compute as pc
t = pq.read_table(sys.argv[1]); print(t.filter(pc.equal(t["shard"], 0))["owner_id"][0])' "$STORE/runs/$RID/plan.parquet")
say "step 3: ray-unlearn forget --owner $OWNER, then audit and the bitwise check"
"${CLI[@]}" forget --run "$RID" --owner "$OWNER" --storage "$STORE" --json >"$STORE/forget.json" || fail "forget"
"${CLI[@]}" audit --run "$RID" --owner "$OWNER" --storage "$STORE" --json >"$STORE/audit.json" || fail "audit"
"$PY" - "$STORE" "$RID" "$OWNER" <<'PY' || fail "forget is not exact"
import json, sys
import torch
from ray_unlearn.platform.core.run import open_run
from tests.conftest import assert_equals_scratch
store, rid, owner = sys.argv[1:]
audit = json.load(open(f"{store}/audit.json"))
assert audit["clean"], audit
ctx = open_run(store, rid)
gone = ctx.plan.sample_ids[ctx.plan.owner_ids == owner]
shard = int(ctx.plan.shards[ctx.plan.owner_ids == owner][0])
assert_equals_scratch(ctx, shard, set(gone.tolist()))  # trains on training.device
live = ctx.model_store.registry().shards[shard].chain[-1]
m = ctx.model_store.manifest(live)["metrics"]
print(f"[gpu_check]   shard {shard}: {len(gone)} rows forgotten, live {live} equals scratch "
      f"bit for bit (retrained on CUDA: {m.get('cuda') == 1.0}); audit clean", file=sys.stderr)
PY

# 4. serve on GPU replicas and answer one prediction
say "step 4: ray-unlearn serve on port $PORT (serving.gpus_per_replica from step 2), one /v1/predict"
serve_one "$RID" "$PORT" || fail "serve"
fi

# 5. S3T: the frozen backbone pre-trained on the driver, every order's adapters trained by
# Ray Train workers on the GPU; every stage version must say it trained on CUDA
say "step 5: ray-unlearn train (digits S3T, 4 shards x 3 slices, B = 3; ${SETTINGS[*]})"
"${CLI[@]}" train --config configs/digits_s3t.yaml --storage "$STORE" --json \
  "${SETTINGS[@]}" s3t.epochs=5 s3t.pretrain_epochs=5 >"$STORE/train-s3t.json" || fail "S3T train"
SRID=$(run_id "$STORE/train-s3t.json")
trained_where_asked "$SRID" || fail "S3T training did not run where asked"

# 6. forget a private owner: deactivation, no training; the stages that serve must equal, bit
# for bit, that order retrained from the stored backbone on the device without the owner
SOWNER=$("$PY" - "$STORE" "$SRID" <<'PY'
import sys
import numpy as np
from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.methods.s3t.runtime import public_sample_ids
ctx = open_run(*sys.argv[1:3])
pub = set(public_sample_ids(ctx).tolist())
train = ctx.plan.shards >= 0
print(next(str(o) for o in np.unique(ctx.plan.owner_ids[train])
           if not set(ctx.plan.samples_of_owner(o).tolist()) & pub))
PY
) || fail "no private owner in the S3T run"
say "step 6: ray-unlearn forget --owner $SOWNER (S3T), then audit and the bitwise check"
"${CLI[@]}" forget --run "$SRID" --owner "$SOWNER" --storage "$STORE" --json >"$STORE/forget-s3t.json" || fail "S3T forget"
"${CLI[@]}" audit --run "$SRID" --owner "$SOWNER" --storage "$STORE" --json >"$STORE/audit-s3t.json" || fail "S3T audit"
"$PY" - "$STORE" "$SRID" "$SOWNER" <<'PY' || fail "S3T forget is not exact"
import json, sys
import torch
from ray_unlearn.platform.core.run import open_run
from ray_unlearn.platform.core.training import configure_threads
from ray_unlearn.platform.methods.s3t.runtime import (
    BACKBONE, load_backbone, load_stage, public_sample_ids, s3t_config, training_device)
from ray_unlearn.platform.methods.s3t.training import train_order
store, rid, owner = sys.argv[1:]
audit = json.load(open(f"{store}/audit-s3t.json"))
assert audit["clean"], audit
ctx = open_run(store, rid)
configure_threads(ctx.config.training.torch_threads)  # as the Train workers (CPU dry run)
mine = ctx.plan.owner_ids == owner
gone = set(ctx.plan.sample_ids[mine].tolist())  # test-split rows too: trained on by nobody
dev = training_device(ctx)  # training.device, resolved here as in the workers
backbone = load_backbone(ctx, device=dev)
blocks = ctx.model_store.manifest(BACKBONE)["blocks"]
public = set(public_sample_ids(ctx).tolist())
for shard in sorted(set(ctx.plan.shards[mine & (ctx.plan.shards >= 0)].tolist())):
    entry = ctx.model_store.registry().shards[shard]
    b, prefix = entry.meta["order_index"], entry.meta["prefix"]
    data = ctx.shard_data(shard, exclude=public | gone)
    again = train_order(backbone, data, entry.meta["orders"][b], b, s3t_config(ctx),
                        seed=ctx.config.seed, blocks=blocks)
    for i in range(1, prefix + 1):
        stored, _ = load_stage(ctx, entry.meta["versions"][f"{b}/{i}"])
        assert stored.metrics.get("cuda") == float(dev.type == "cuda"), stored.metrics
        a, r = stored.tensors(), again[i - 1].tensors()
        assert a.keys() == r.keys() and all(torch.equal(a[k], r[k]) for k in a), f"stage {i}"
    print(f"[gpu_check]   S3T shard {shard}: the owner's rows deactivated (dead slices "
          f"{entry.meta['dead_slices']}); order {b} serves stages 1..{prefix}, equal bit for "
          f"bit to that order retrained on {dev} without them", file=sys.stderr)
print(f"[gpu_check]   {len(gone)} rows of {owner} forgotten; audit clean", file=sys.stderr)
PY

# 7. serve the S3T run: stage models rebuilt on the replicas' device over one shared backbone
say "step 7: ray-unlearn serve (S3T) on port $((PORT + 1)), one /v1/predict"
serve_one "$SRID" "$((PORT + 1))" || fail "S3T serve"
if [ "$ON_CUDA" = 1 ]; then say "all GPU checks passed"; else say "CPU dry run passed"; fi
