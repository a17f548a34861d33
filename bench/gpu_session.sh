#!/usr/bin/env bash
# One device-machine session: the GPU test suite and the benchmarks, in as few minutes as possible.
# Written for a 2-GPU machine: two lanes of single-GPU work run side by side (one per GPU), then the parts that
# need every GPU; on one GPU the lanes run one after the other.
#   LANE0 / LANE1 / MULTI: space-separated part names (see `part_*` below), e.g.
#   LANE0="kernel" LANE1="tests masks cp_sim" MULTI="nccl cp_multi train_cp" bash bench/gpu_session.sh
#   LANE1_GPUS: the GPUs of the second lane (default 1), e.g. LANE1_GPUS=1,2,3 LANE1=nccl with
#   FLEXDIST_CP_NCCL_WORLDS=3 runs the NCCL suite at world size 3 beside a timing lane on GPU 0 (4-GPU machines)
# Every part has its own time limit; results (JSON, logs) go to $OUT/results.tar.gz, a summary to stdout.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
R="$OUT/r"; rm -rf "$R"; mkdir -p "$R"  # (an output folder left from an earlier call must not mix in)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 OMP_NUM_THREADS=4
NGPU=$(python3 -c 'import torch; print(torch.cuda.device_count())')
T0=$(date +%s)
{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; python3 -m flexdist --version;
  echo "cpus: $(nproc)"; } > "$R/machine.txt" 2>&1

run_part() {  # name, limit_s, command...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  # SIGINT first: pytest and the benchmarks print what they have (failure summaries, rows) before exiting
  timeout -s INT -k 15 "$limit" "$@" > "$R/$name.log" 2>&1
  echo "$name rc=$? took $(( $(date +%s) - t ))s (t=$(( $(date +%s) - T0 ))s)" | tee -a "$R/parts.txt"
  snapshot
}
snapshot() {  # results so far, so a call cut by the device's own limit still returns the finished parts
  local tmp="$OUT/.results.$$.$RANDOM.tar.gz"
  tar czf "$tmp" --exclude='*checkpoints*' -C "$OUT" r 2>/dev/null && mv -f "$tmp" "$OUT/results.tar.gz"
}
part_kernel()  { run_part kernel  "${T_KERNEL:-300}" python3 bench/bench_kernel.py --seqs "${KERNEL_SEQS:-8192,32768,131072}" ${KERNEL_ARGS:-} --out "$R/kernel_h100.json"; }
part_tests()   { run_part pytest_gpu "${T_TESTS:-200}" python3 -m pytest -q -rfE --tb=short -n 6 --dist loadfile \
                   -p no:cacheprovider --timeout 180 ${TEST_FILES:-tests --deselect tests/test_cp_nccl.py}; }
part_kernel_sweep() { run_part kernel_sweep "${T_SWEEP:-150}" python3 bench/bench_kernel.py --sweep --sweep-seq "${SWEEP_SEQ:-8192}" \
                   --masks "${SWEEP_MASKS:-doc1k,doc4k}" ${SWEEP_ARGS:-} --out "$R/kernel_sweep_h100.json"; }
part_kprof()   { run_part kprof   "${T_KPROF:-120}" python3 bench/profile_kernel.py --mode torch ${KPROF_ARGS:-} --out "$R/kernel_profile_h100.json"; }
part_hostprof() { run_part hostprof "${T_HOSTPROF:-60}" python3 bench/profile_kernel.py --mode host --masks doc1k --seq 8192 --iters 50; }
part_ncu() {  # Nsight Compute counters of one fwd+bwd per implementation (flexdist's kernels, torch flex's)
  local ncu; ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  run_part ncu "${T_NCU:-240}" "${ncu:-ncu}" --clock-control none --profile-from-start off --csv --page details \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section ComputeWorkloadAnalysis python3 bench/profile_kernel.py --mode ncu ${NCU_ARGS:---masks doc4k}; }
part_hgroups() { run_part hgroups "${T_HGROUPS:-150}" python3 bench/bench_kernel.py --head-groups "${HGROUPS:-1,2,4,16}" \
                   --seqs "${HG_SEQS:-8192,32768}" --masks "${HG_MASKS:-causal,doc4k,doc1k}" --out "$R/head_groups_h100.json"; }
part_host()    { run_part host    "${T_HOST:-90}" python3 bench/bench_host.py ${HOST_ARGS:-} --out "$R/host_h100.json"; }
part_masks()   { run_part masks   "${T_MASKS:-120}" python3 bench/bench_masks.py ${MASKS_ARGS:-} --out "$R/masks_h100.json"; }
part_gluon_fwd() { run_part gluon_fwd "${T_GLUON:-200}" python3 bench/bench_gluon_fwd.py ${GLUON_ARGS:-} --out "$R/gluon_fwd_h100.json"; }
part_gluon_bwd() { run_part gluon_bwd "${T_GLUON:-200}" python3 bench/bench_gluon_bwd.py ${GLUON_ARGS:-} --out "$R/gluon_bwd_h100.json"; }
part_cp_sim()  { run_part cp_sim  "${T_CPSIM:-150}" python3 bench/bench_cp_sim.py ${CPSIM_ARGS:-} --out "$R/cp_sim_h100.json"; }
part_diag()    { run_part diag_rank_calls "${T_DIAG:-150}" python3 bench/diag_rank_calls.py ${DIAG_ARGS:-} --out "$R/diag_rank_calls_h100.json"; }
part_cp_sim_b() { run_part cp_sim_b "${T_CPSIM:-150}" python3 bench/bench_cp_sim.py ${CPSIM_B_ARGS:-} --out "$R/cp_sim_b_h100.json"; }
part_train350m() { run_part train_350m "${T_TRAIN:-280}" python3 bench/bench_train.py --models 350m --seq-lens 16384 \
                   --attention flexdist --compile none blocks --ac none selective --out "$R/train_350m_h100.json"; }
part_train1b() { run_part train_1b "${T_TRAIN:-280}" python3 bench/bench_train.py --models 1b ${TRAIN_ARGS:-} --out "$R/train_1b_h100.json"; }
part_tests_multi() { run_part pytest_multi "${T_TESTS_MULTI:-200}" python3 -m pytest -q -rfE --tb=short -p no:cacheprovider \
                   tests/test_train_compile.py -k gpu_fsdp2; }  # FSDP2 + cp = 2 + compiled blocks on two GPUs
part_nccl()    { run_part pytest_nccl "${T_NCCL:-120}" python3 -m pytest -q -s -rfE --tb=short -p no:cacheprovider tests/test_cp_nccl.py; }
part_nccl_split() {  # the whole NCCL suite, split into case ranges run side by side (every group uses GPUs 0..w-1;
  # a cold cache costs 7-25 s of compiling per case, which the host's CPUs do in parallel): NCCL_SPLIT_WORLDS="3 4"
  local t=$(date +%s) pids=() w rg rc=0
  for w in ${NCCL_SPLIT_WORLDS:-3 4}; do
    for rg in ${NCCL_SPLIT_RANGES:-0-9 10-19 20-29 30-39 40-49 50-56}; do
      FLEXDIST_CP_NCCL_WORLDS=$w FLEXDIST_CP_NCCL_CASES=$rg timeout -s INT -k 15 "${T_NCCL:-480}" python3 -m pytest \
        -q -s -rfE --tb=short -p no:cacheprovider tests/test_cp_nccl.py > "$R/nccl_w${w}_c${rg}.log" 2>&1 & pids+=($!)
    done
  done
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  echo "nccl_split rc=$rc took $(( $(date +%s) - t ))s (t=$(( $(date +%s) - T0 ))s)" | tee -a "$R/parts.txt"
  snapshot
}
part_cp_multi() { run_part cp_multi "${T_CPMULTI:-150}" torchrun --standalone --nproc-per-node "$NGPU" \
                   bench/bench_cp_multi.py ${CPMULTI_ARGS:-} \
                   ${CPMULTI_PROFILE:+--profile-dir $R/cp_profile --profile-rows $CPMULTI_PROFILE} --out "$R/cp_multi_${NGPU}gpu.json"; }
part_train_cp() { FLEXDIST_RUN_DIR="$R/train_1b_cp${NGPU}" run_part train_1b_cp "${T_TRAINCP:-180}" \
                   torchrun --standalone --nproc-per-node "$NGPU" -m train model=1b parallel=cp parallel.cp="$NGPU" \
                   optim=adamw trainer.seq_len=131072 trainer.steps="${TRAINCP_STEPS:-12}" \
                   trainer.activation_checkpointing=true trainer.ckpt_interval=0 trainer.log_interval=1 ${TRAINCP_ARGS:-}; }
part_train_cp_ab() {  # the same 1b cp run (same data and steps) per CP strategy: TRAINAB="ring allgather:2 allgather:2:lf"
  local s st hc rest tag lf  # (strategy[:head_chunks[:lf|nolf[:tag]]], lf = cp_local_first; a tag names a repeat)
  for s in ${TRAINAB:-ring allgather:2}; do
    IFS=: read -r st hc rest tag <<< "$s"; hc=${hc:-1}; lf=false; [ "$rest" = lf ] && lf=true
    rest=${rest#nolf}; rest=${rest}${tag:+_$tag}; rest=${rest#_}
    FLEXDIST_RUN_DIR="$R/train_1b_cp${NGPU}_${st}_hc${hc}${rest:+_$rest}" run_part "train_1b_cp_${st}_hc${hc}${rest:+_$rest}" "${T_TRAINCP:-180}" \
      torchrun --standalone --nproc-per-node "$NGPU" -m train model=1b parallel=cp parallel.cp="$NGPU" \
      parallel.cp_strategy="$st" parallel.cp_head_chunks="$hc" parallel.cp_local_first="$lf" optim=adamw trainer.seq_len="${TRAINAB_SEQ:-131072}" \
      trainer.steps="${TRAINCP_STEPS:-12}" trainer.activation_checkpointing=true trainer.ckpt_interval=0 \
      trainer.log_interval=1 ${TRAINCP_ARGS:-}
  done; }
lane() { for p in $1; do "part_$p"; done; }

if [ "$NGPU" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 lane "${LANE0:-}" & a=$!
  CUDA_VISIBLE_DEVICES="${LANE1_GPUS:-1}" lane "${LANE1:-}" & b=$!
  wait $a $b
else
  lane "${LANE0:-} ${LANE1:-}"
fi
[ "$NGPU" -ge 2 ] && lane "${MULTI:-}"
echo "== parts"; cat "$R/parts.txt"
for f in "$R"/*.log; do echo "== $f"; tail -n 8 "$f"; done
find "$R" -path '*checkpoints*' -prune -exec rm -rf {} + 2>/dev/null
tar czf "$OUT/results.tar.gz" -C "$OUT" r && rm -rf "$R"
