#!/usr/bin/env bash
# jobs/submit.sh - sbatch a job script of jobs/ with this cluster's settings (jobs/site.sh:
# partition, account, time, signal lead, extra options). Run it from anywhere; the job runs
# in the repository root. Prints the sbatch command on stderr and sbatch's answer on stdout.
#   jobs/submit.sh jobs/ucf101_vgg8_skip_add.sbatch                  # a paper experiment
#   jobs/submit.sh jobs/train.sbatch jobs/configs/x.toml --set optim.lr=1e-3
#   jobs/submit.sh jobs/train_cpu.sbatch jobs/configs/demo_motion.toml
#   jobs/submit.sh jobs/ablation_grid.sbatch
#   jobs/submit.sh jobs/data_prep.sbatch ucf101 /data/UCF-101 /data/ucfTrainTestlist data/ucf101
#   PARTITION=a100 TIME=4:00:00 EXTRA_SBATCH="--qos=short" jobs/submit.sh jobs/train.sbatch ...
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=jobs/site.sh
source "$here/site.sh"
[ $# -ge 1 ] || { sed -n '2,10p' "$0" >&2; exit 2; }
script=$1
shift
[ -f "$script" ] || { echo "submit.sh: $script: no such job script" >&2; exit 2; }
script=$(cd "$(dirname "$script")" && pwd)/$(basename "$script")
case "$(basename "$script")" in
  data_prep.sbatch) opts=(--partition="$CPU_PARTITION" --time="$DATA_TIME") ;;
  *_cpu.sbatch) opts=(--partition="$CPU_PARTITION" --time="$TIME" --signal="B:USR1@$SIGNAL_LEAD") ;;
  *) opts=(--partition="$PARTITION" --time="$TIME" --signal="B:USR1@$SIGNAL_LEAD") ;;
esac
if [ -n "$ACCOUNT" ]; then
  opts+=(--account="$ACCOUNT")
fi
read -r -a extra <<< "$EXTRA_SBATCH"
opts+=("${extra[@]}")
cd "$here/.."
echo "+ (cd $PWD && sbatch ${opts[*]} $script $*)" >&2
exec sbatch "${opts[@]}" "$script" "$@"
