#!/usr/bin/env bash
# The optimizer study of docs/results/optimizer_study.md, one part per call:
#   bash docs/results/optimizer_study.sh width|depth [ROOT]      (ROOT default outputs/optimizer_study)
# width: experiment=optimizer_study (AdamW, Muon × d = 128, 256); depth: experiment=mhc_depth_study
# (residual, hc, mhc × 4, 8, 16 layers, Muon). Each part: stage 1 (lr grid) -> report --lr
# (lr_sweep.json) -> stage 2 (each arm at its best lr, seeds 0-2) -> report, then the reports and
# plots are copied to docs/results/optimizer_study/PART/.
# Resumable: every run has a fixed out_dir and trainer.resume=auto, so calling it again with the
# same ROOT continues each unfinished run from its last checkpoint (finished runs only re-read
# their final checkpoint). Extra arguments after ROOT go to both stages' launch.py.
set -euo pipefail
shopt -s nullglob
part=${1:?width or depth}
root=${2:-outputs/optimizer_study}
shift $(( $# < 2 ? $# : 2 ))
case $part in
  width) experiment=optimizer_study ;;
  depth) experiment=mhc_depth_study ;;
  *) echo "error: part $part: accepted width, depth" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/../.."
# One thread per part: both parts run side by side on a 2-core machine (small matrices use two
# threads poorly; two processes use both cores fully).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# fp32 Newton-Schulz: this CPU (AMD EPYC, no AVX-512-BF16/AMX) runs bf16 matmuls ~15x slower than fp32.
common=(optim.ns_dtype=fp32 trainer.resume=auto trainer.progress=false "$@")
dir=$root/$part
stamp() { echo "[$(date '+%F %T')] $*"; }

stamp "$part stage 1: $dir/stage1"
# A job that diverges or is refused does not stop the others; the reports say which.
python launch.py -m experiment=$experiment "${common[@]}" out_dir=$dir/stage1 || stamp "stage 1: a job failed"
# stage1_* directories: grids extended for one curve (docs/results/optimizer_study.md) join the curves
python -m train.report $dir/stage1 $dir/stage1_* --lr --out $dir/stage1
stamp "$part stage 2: $dir/stage2 (best lrs from $dir/stage1/lr_sweep.json)"
python launch.py -m experiment=$experiment study=tuned study.best_lr_from=$dir/stage1/lr_sweep.json \
  "${common[@]}" out_dir=$dir/stage2 || stamp "stage 2: a job failed"
python -m train.report $dir/stage2
out=docs/results/optimizer_study/$part
mkdir -p $out/stage1 $out/stage2
for s in stage1 stage2; do
  cp $dir/$s/report.md $dir/$s/*.png $out/$s/
  cp $dir/$s/*.json $out/$s/ 2>/dev/null || true
done
stamp "$part done: $out"
