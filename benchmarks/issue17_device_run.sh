#!/bin/bash
# Device-machine driver for the issue-17 measurements: installs the carried wheels (sparsify into its own
# folder, SAELens + transformer-lens 3.x into another), then runs the steps named in $STEPS.
# Run from the repository copy; wheels are looked up in ../whl/{sparsify,saelens}.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-../whl}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sparsify "$WHEELS"/sparsify/*.whl 2>&1 | grep -v WARNING
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/saelens "$WHEELS"/saelens/*.whl 2>&1 | grep -v WARNING
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in $STEPS; do
  echo "=== $step ($(date +%T))"
  case $step in
    check1) timeout 60 python3 benchmarks/sparse_update_check.py --d-in 512 --d-sae 16384 --k 40 --steps 30 2>&1 | tee $OUT/check.log ;;
    check1p) timeout 60 python3 benchmarks/sparse_update_check.py --d-in 512 --d-sae 16384 --k 40 --steps 20 \
              --set GRAD_ONE_PASS_ENTRIES_PER_BLOCK=0 2>&1 | tee $OUT/check_one_pass.log ;;
    check) timeout 240 python3 benchmarks/sparse_update_check.py --d-in 512 --d-sae 16384 --k 40 2>&1 | tee $OUT/check.log
           timeout 240 python3 benchmarks/sparse_update_check.py --d-in 2304 --d-sae 65536 --k 64 --steps 30 2>&1 | tee -a $OUT/check.log ;;
    table1) timeout 420 python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,131072 --k 40 --profile \
              --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --min-seconds 0.5 --json $OUT/table1.json 2>&1 | tee $OUT/table1.log ;;
    table) timeout ${TABLE_TIMEOUT:-430} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --min-seconds ${MIN_SECONDS:-0.4} --profile --profile-d-sae 16384,262144 \
              --memory-d-sae 1048576 --memory-try-largest --architectures batchtopk,matryoshka_batchtopk --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    profile) timeout 200 python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,262144 --k 64 --profile --no-sparsify --no-saelens \
              --min-seconds 0.3 2>&1 | tee $OUT/profile.log ;;
    variants) timeout ${VARIANTS_TIMEOUT:-65} python3 benchmarks/issue17_variants.py --sizes 2304x262144x40,512x16384x40,2304x16384x40 --min-seconds 0.25 \
              --json $OUT/variants.json --best $OUT/best.txt 2>&1 | tee $OUT/variants.log ;;
    table2) timeout ${TABLE_TIMEOUT:-150} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --sparsify-path /tmp/sparsify --no-saelens --min-seconds 0.4 --profile --profile-d-sae 16384,262144 $(cat $OUT/best.txt 2>/dev/null) \
              --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    registers) timeout 60 python3 benchmarks/issue17_registers.py 2>&1 | grep -v -i warn | tee $OUT/registers.log ;;
    round3) timeout ${TABLE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,262144 --k 40 \
              --sparsify-path /tmp/sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.4} --profile \
              --variant onepass64:GRAD_ONE_PASS_ENTRIES_PER_BLOCK=64 --variant loop9:GRAD_PROGRAM_COLUMN_BLOCKS=9 \
              --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    check4) timeout 90 python3 benchmarks/sparse_update_check.py --d-in 512 --d-sae 16384 --k 40 --steps 20 2>&1 | tee $OUT/check.log
            timeout 120 python3 benchmarks/sparse_update_check.py --d-in 2304 --d-sae 65536 --k 64 --steps 20 2>&1 | tee -a $OUT/check.log ;;
    round4) timeout ${TABLE_TIMEOUT:-330} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,262144 --k 40 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.3} --profile --profile-rows ${PROFILE_ROWS:-24} \
              --variant round3:TOPK_ROWS=1,TOPK_TILE_PER_THREAD=None,ADAM_ROWS_PROJECTION_GIVEN=False,DECODE_WIDE_COLUMNS=None \
              --variant topk1:TOPK_ROWS=1 --variant topk8:TOPK_ROWS=8 --variant tile64:TOPK_TILE_PER_THREAD=64 \
              --variant adam3:ADAM_ROWS_PROJECTION_GIVEN=False --variant dec3:DECODE_WIDE_COLUMNS=None --variant dec512:DECODE_WIDE_COLUMNS=512 \
              --json $OUT/variants.json 2>&1 | tee $OUT/variants.log ;;
    round4b) timeout ${TABLE_TIMEOUT:-300} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,131072 --k 40 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.3} --profile --profile-rows ${PROFILE_ROWS:-30} \
              --variant round4a:TOPK_ROWS=4,TOPK_TILE_PER_THREAD=32,SELECTED_DOT_WIDE_COLUMNS=None --variant topk4:TOPK_ROWS=4 \
              --variant tile128:TOPK_TILE_PER_THREAD=128 --variant dot3:SELECTED_DOT_WIDE_COLUMNS=None --variant dot512:SELECTED_DOT_WIDE_COLUMNS=512 \
              --variant dotrows16:SELECTED_DOT_ROWS=16 --variant op32:GRAD_ONE_PASS_ENTRIES=32 --variant op128:GRAD_ONE_PASS_ENTRIES=128 \
              --variant gwarps4:GRAD_WARPS=4 --json $OUT/variants_b.json 2>&1 | tee $OUT/variants_b.log ;;
    round4c) timeout ${TABLE_TIMEOUT:-300} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 65536,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.3} --profile --profile-rows ${PROFILE_ROWS:-16} \
              --variant lw8:GRAD_LOOPING_WARPS=8 --variant lw2:GRAD_LOOPING_WARPS=2 --variant cb2:GRAD_PROGRAM_COLUMN_BLOCKS=2 \
              --variant cb9:GRAD_PROGRAM_COLUMN_BLOCKS=9 --variant th160:GRAD_ONE_PASS_ENTRIES_PER_BLOCK=160 \
              --variant e64:GRAD_ENTRIES=64 --json $OUT/variants_c.json 2>&1 | tee $OUT/variants_c.log ;;
    round4d) timeout ${TABLE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.4} --profile --profile-rows ${PROFILE_ROWS:-12} \
              --variant dense20:GRAD_DENSE_ENTRIES_PER_LATENT=20 --variant dense8:GRAD_DENSE_ENTRIES_PER_LATENT=8 \
              --json $OUT/variants_d.json 2>&1 | tee $OUT/variants_d.log ;;
    final) timeout ${TABLE_TIMEOUT:-480} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --min-seconds ${MIN_SECONDS:-0.4} --profile --profile-d-sae 16384,262144 \
              --profile-rows ${PROFILE_ROWS:-20} --memory-d-sae 1048576 --memory-try-largest --architectures batchtopk,matryoshka_batchtopk \
              --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    final2) timeout ${TABLE_TIMEOUT:-300} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --min-seconds ${MIN_SECONDS:-0.4} --profile --profile-d-sae 16384,262144 \
              --profile-rows ${PROFILE_ROWS:-20} --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    check5) timeout 45 python3 benchmarks/sparse_update_check.py --d-in 512 --d-sae 16384 --k 40 --steps 20 2>&1 | tee $OUT/check.log
            timeout 45 python3 benchmarks/sparse_update_check.py --d-in 2304 --d-sae 65536 --k 64 --steps 10 2>&1 | tee -a $OUT/check.log ;;
    round5) timeout ${TABLE_TIMEOUT:-240} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.2} --profile --profile-d-sae 16384 --profile-rows ${PROFILE_ROWS:-40} \
              --variant r4:CLIP_PROGRAMS=False,WORK_ITEMS_PROGRAM=False,FUSED_SQUARED_ERROR=False --variant noitems:WORK_ITEMS_PROGRAM=False \
              --json $OUT/variants_5.json 2>&1 | tee $OUT/variants_5.log ;;
    quality) timeout ${QUALITY_TIMEOUT:-160} python3 benchmarks/train_quality.py --widths 4096,16384 --seeds 1 2>&1 | tee $OUT/quality.log ;;
    round6) timeout ${TABLE_TIMEOUT:-240} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.2} --profile --profile-d-sae 16384 --profile-rows ${PROFILE_ROWS:-30} \
              --variant r5:TOPK_EARLY_EXIT=False,COUNTING_SORT=False,ADAM_BIASES_ONE_LAUNCH=False,TOPK_WRITES_VALUES=False,TOPK_COUNTS_FIRING=False,FIRING_PROGRAM=False,RECORD_LOW_CENTERED=False,DECODE_ADDS_BIAS=False,SHARED_ZERO_FILL=False \
              --variant noexit:TOPK_EARLY_EXIT=False --variant torchsort:COUNTING_SORT=False --variant chunk64:COUNTING_SORT_CHUNK=64 --variant chunk256:COUNTING_SORT_CHUNK=256 \
              --variant bits7:COUNTING_SORT_DIGIT_BITS=7 --variant bits9:COUNTING_SORT_DIGIT_BITS=9 --variant adam2:ADAM_BIASES_ONE_LAUNCH=False \
              --json $OUT/variants_6.json 2>&1 | tee $OUT/variants_6.log ;;
    final6) timeout ${TABLE_TIMEOUT:-540} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --min-seconds ${MIN_SECONDS:-0.4} --profile --profile-d-sae 16384,262144 \
              --profile-rows ${PROFILE_ROWS:-20} --memory-d-sae 1048576 --memory-try-largest --architectures batchtopk,matryoshka_batchtopk \
              --variant r5:TOPK_EARLY_EXIT=False,COUNTING_SORT=False,ADAM_BIASES_ONE_LAUNCH=False,TOPK_WRITES_VALUES=False,TOPK_COUNTS_FIRING=False,FIRING_PROGRAM=False,RECORD_LOW_CENTERED=False,DECODE_ADDS_BIAS=False,SHARED_ZERO_FILL=False --variant countsort:COUNTING_SORT=True --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    batch7) for d_in in 512 2304; do
              timeout ${TABLE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in $d_in --d-sae 16384,65536,131072 --k 40 \
                --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.3} --profile --profile-d-sae 16384 --profile-rows ${PROFILE_ROWS:-16} \
                --architectures-max-d-sae 131072 --architectures "batchtopk,batchtopk:batch_topk_cap_multiple=0,batchtopk:batch_topk_cap_multiple=2,matryoshka_batchtopk,matryoshka_batchtopk:batch_topk_cap_multiple=0" \
                --json $OUT/batch7_$d_in.json 2>&1 | tee $OUT/batch7_$d_in.log
            done ;;
    final7) timeout ${TABLE_TIMEOUT:-420} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --sparsify-path /tmp/sparsify --saelens-path /tmp/saelens --min-seconds ${MIN_SECONDS:-0.4} --profile --profile-d-sae 16384 \
              --profile-rows ${PROFILE_ROWS:-20} --architectures-max-d-sae 262144 \
              --architectures "batchtopk,batchtopk:batch_topk_cap_multiple=0,matryoshka_batchtopk,matryoshka_batchtopk:batch_topk_cap_multiple=0" \
              --json $OUT/table.json 2>&1 | tee $OUT/table.log ;;
    round8b) timeout ${TABLE_TIMEOUT:-400} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} --profile --profile-rows ${PROFILE_ROWS:-12} \
              --variant st1:GRAD_ONE_PASS_STAGES=1 --variant st2:GRAD_ONE_PASS_STAGES=2 --variant st4:GRAD_ONE_PASS_STAGES=4 \
              --variant st5:GRAD_ONE_PASS_STAGES=5 --variant l64:GRAD_LATENTS=64 --variant l16:GRAD_LATENTS=16 \
              --variant c256:GRAD_COLUMNS=128 --variant c64:GRAD_COLUMNS=32 --variant e128s2:GRAD_ONE_PASS_ENTRIES=128,GRAD_ONE_PASS_STAGES=2 \
              --json $OUT/variants_8b.json 2>&1 | tee $OUT/variants_8b.log ;;
    round8c) timeout ${TABLE_TIMEOUT:-330} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} --profile --profile-d-sae 16384 --profile-rows ${PROFILE_ROWS:-4} \
              --variant st1:GRAD_ONE_PASS_STAGES=1 --variant o16:GRAD_ONE_PASS_LATENTS=16 --variant o16st1:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1 \
              --variant o16st2:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=2 --variant o16st1e32:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32 \
              --variant o16st1w4:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_WARPS=4 \
              --json $OUT/variants_8c.json 2>&1 | tee $OUT/variants_8c.log
              timeout ${WIDE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 131072,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} \
              --variant l16:GRAD_LATENTS=16 --variant o16st1:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1 \
              --json $OUT/variants_8c_wide.json 2>&1 | tee $OUT/variants_8c_wide.log ;;
    round8d) timeout ${TABLE_TIMEOUT:-330} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} --profile --profile-d-sae 16384 --profile-rows ${PROFILE_ROWS:-4} \
              --variant b:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32 --variant bw4:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32,GRAD_WARPS=4 --variant be16:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=16 \
              --variant bc128:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32,GRAD_COLUMNS=128 --variant bc32:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32,GRAD_COLUMNS=32 --variant bc128w4:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32,GRAD_COLUMNS=128,GRAD_WARPS=4 \
              --json $OUT/variants_8d.json 2>&1 | tee $OUT/variants_8d.log
              timeout ${WIDE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 131072,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} \
              --variant b:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32 --variant bth32:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32,GRAD_ONE_PASS_ENTRIES_PER_BLOCK=32 --variant bth16:GRAD_ONE_PASS_LATENTS=16,GRAD_ONE_PASS_STAGES=1,GRAD_ONE_PASS_ENTRIES=32,GRAD_ONE_PASS_ENTRIES_PER_BLOCK=16 \
              --json $OUT/variants_8d_wide.json 2>&1 | tee $OUT/variants_8d_wide.log ;;
    round8e) timeout ${TABLE_TIMEOUT:-330} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} \
              --variant r7:GRAD_ONE_PASS_ENTRIES_PER_BLOCK=64,GRAD_ONE_PASS_ENTRIES=64,GRAD_ONE_PASS_STAGES=None,GRAD_ONE_PASS_LATENTS=None,GRAD_ONE_PASS_COLUMNS=64,GRAD_ONE_PASS_WARPS=8 --variant c64w8:GRAD_ONE_PASS_COLUMNS=64,GRAD_ONE_PASS_WARPS=8 --variant c64:GRAD_ONE_PASS_COLUMNS=64 \
              --variant th8:GRAD_ONE_PASS_ENTRIES_PER_BLOCK=8 --json $OUT/variants_8e.json 2>&1 | tee $OUT/variants_8e.log ;;
    round8f) timeout ${TABLE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in 512 --d-sae 16384 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.3} --profile --profile-rows ${PROFILE_ROWS:-10} \
              --variant dr16:DECODE_ROWS=16 --variant dr4:DECODE_ROWS=4 --variant dc128:DECODE_WIDE_COLUMNS=128 \
              --variant sr16:SELECTED_DOT_ROWS=16 --variant sr4:SELECTED_DOT_ROWS=4 --variant sc128:SELECTED_DOT_WIDE_COLUMNS=128 \
              --variant tc32:TOPK_CHUNK=32 --variant tc8:TOPK_CHUNK=8 --variant tw2:TOPK_WARPS=2 \
              --json $OUT/variants_8f.json 2>&1 | tee $OUT/variants_8f.log ;;
    round8g) timeout ${TABLE_TIMEOUT:-330} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384,65536,131072,262144 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.25} --profile --profile-d-sae 16384,262144 --profile-rows ${PROFILE_ROWS:-2} \
              --variant dr4:DECODE_ROWS=4 --variant dr4sc128:DECODE_ROWS=4,SELECTED_DOT_WIDE_COLUMNS=128 --variant dc128:DECODE_WIDE_COLUMNS=128 \
              --json $OUT/variants_8g.json 2>&1 | tee $OUT/variants_8g.log ;;
    round8h) timeout ${TABLE_TIMEOUT:-200} python3 benchmarks/train_throughput.py --d-in 512,2304 --d-sae 16384 --k 40,64 \
              --no-sparsify --no-saelens --min-seconds ${MIN_SECONDS:-0.3} --profile --profile-rows ${PROFILE_ROWS:-2} \
              --variant c256:GRAD_ONE_PASS_COLUMNS=256 --variant c256w8:GRAD_ONE_PASS_COLUMNS=256,GRAD_ONE_PASS_WARPS=8 \
              --variant e16w8:GRAD_ONE_PASS_ENTRIES=16,GRAD_ONE_PASS_WARPS=8 --variant st2:GRAD_ONE_PASS_STAGES=2 \
              --json $OUT/variants_8h.json 2>&1 | tee $OUT/variants_8h.log ;;
    quality7) for architecture in batchtopk matryoshka_batchtopk; do
              timeout ${QUALITY_TIMEOUT:-200} python3 benchmarks/train_quality.py --architecture $architecture --widths 4096,16384 --seeds 1 2>&1 | tee $OUT/quality7_$architecture.log
            done ;;
  esac
done
echo "=== done ($(date +%T))"
