#!/bin/bash
# The ledger model's device run, in one call of the device tool (carry .demo-data, made by scripts/demo_data.py):
#   TRAIN_MIN=8 SHORT_MIN=3 REPEAT=0.5 bash scripts/ledger_device_run.sh  # train (short problems first, repeated
#                                                            # prose passages), export, stats, diagnostics
#   INIT=triattn_local/demo/ledger_model TRAIN_MIN=6 ...     # continue from an exported model (warm-up again)
#   FIDELITY=1 ...                                           # then the fidelity table at ~4x/8x/16x of the mean
# Returns under $OUT: the weight shards, meta.tar (config, tokenizer, stats, train log, diag.json/.log), fid/.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
R=/tmp/ledger-run M=/tmp/ledger-model
nvidia-smi --query-gpu=name --format=csv,noheader
python3 scripts/train_ledger.py --out $R ${INIT:+--init $INIT} --minutes ${TRAIN_MIN:-8} \
  --short-minutes ${SHORT_MIN:-0} --repeat ${REPEAT:-0} --total-minutes ${TOTAL_MIN:-${TRAIN_MIN:-8}} --workers ${WORKERS:-8} > /tmp/train.log 2>&1
grep -E "step [0-9]*(00|50) |short|full|stopped|param" /tmp/train.log | tail -40
python3 scripts/train_ledger.py --out $R --export $M --shard 15MB 2>&1 | tail -1
cp /tmp/train.log $M/
python3 -m triattn_local.demo.ledger --calibration 8 > /tmp/cal.txt
timeout 60 python3 -c "
from triattn_local.backends import load_engine
e = load_engine('$M', device='cuda', dtype='float32')
s = e.calibrate(open('/tmp/cal.txt').read(), progress=False)
s.save('$M/triattn_stats.safetensors'); import numpy as np; print('stats concentration median', np.median(s.concentration()))"
cp $M/model-*.safetensors $OUT/
timeout ${DIAG_S:-120} python3 -m triattn_local.diagnose $M --device cuda --problems 8 --budgets 256,512,1024 \
  --accuracy ${ACCURACY:-200} --out $M/diag.json 2>&1 | grep -v "Loading weights" | tee $M/diag.log
tar cf $OUT/meta.tar -C $M --exclude 'model-*.safetensors' .
if [ "${FIDELITY:-0}" = 1 ]; then
  python3 -m triattn_local.cli eval --model $M --task ledger --device cuda --jobs 14 --batch 64 \
    --budgets ${BUDGETS:-512,1024,2048} --teacher-forcing --out $OUT/fid 2>&1 | grep -v "^Loading"
fi
ls -la $OUT
