#!/usr/bin/env bash
# The SteerLM pipeline as a chain of Slurm jobs: reward -> label -> sft -> evaluate (+ steerlm2, ppo), one
# slurm/<stage>.sbatch job per stage, each held until the jobs it reads from succeed (--dependency=afterok).
# A failed stage cancels every stage after it (--kill-on-invalid-dep=yes: DependencyNeverSatisfied).
#
#   slurm/pipeline.sh --run-dir runs/pipe                                 # the 4 default stages
#   slurm/pipeline.sh --run-dir runs/pipe --sbatch "--partition=gpu --gpus-per-node=8 --exclusive" \
#       --sbatch-evaluate "--gpus-per-node=1" sft.engine.strategy=fsdp2 sft.train.max_steps=-1
#   slurm/pipeline.sh --run-dir runs/pipe --stages sft,evaluate --after 1234   # re-use reward/ and label/
#
# Wiring (as in conf/pipeline.yaml; each stage's outputs land in --run-dir/<stage>):
#   reward   run_dir=R/reward
#   label    rm=R/reward/model output_dir=R/label
#   sft      run_dir=R/sft data.train=[{format: canonical, path: R/label/labeled.jsonl}]
#   evaluate model.path=R/sft/model rm=R/reward/model output_dir=R/evaluate
#   steerlm2 policy=R/sft/model rm=R/reward/model run_dir=R/steerlm2
#   ppo      policy=R/sft/model rm=R/reward/model run_dir=R/ppo reward.standardize_from=R/label/labeled.jsonl
# Stage sizes are each recipe's own defaults (conf/<stage>.yaml), not conf/pipeline.yaml's 2-CPU-core sizes.
#
# Overrides: <stage>.<key>=<value> goes to that stage as <key>=<value> (reward.optim.lr=1e-5, label.chunk_size=128,
# +sft.foo=1); model=<name> and model.<key>=<value> go to reward and sft (the shared backbone, as in
# conf/pipeline.yaml). Options:
#   --run-dir DIR        where every stage writes (default runs/pipeline; relative to the current directory)
#   --stages LIST        comma-separated, any of reward,label,sft,evaluate,steerlm2,ppo (default: the first 4);
#                        stages left out are expected to have their outputs in DIR already
#   --after JOBID        the first submitted stages also wait for this job (afterok)
#   --sbatch ARGS        extra sbatch arguments for every stage (split on spaces)
#   --sbatch-<stage> ARGS   extra sbatch arguments for one stage (after --sbatch, so they win)
#   --dry-run            print the sbatch commands instead of submitting
# Output: one line per stage, "<stage> <job id>", in submission order. Logs: DIR/slurm/<stage>-<job id>.out.
# The environment is exported to the jobs (STEERLM_NPROC_PER_NODE, STEERLM_PYTHON, ...: slurm/_launch.sh).
set -euo pipefail

ALL=(reward label sft evaluate steerlm2 ppo)
declare -A RECIPE=([reward]=train_reward [label]=label [sft]=train_sft [evaluate]=evaluate
                   [steerlm2]=train_steerlm2 [ppo]=train_ppo)
declare -A READS=([reward]="" [label]="reward" [sft]="label" [evaluate]="reward sft"
                  [steerlm2]="reward sft" [ppo]="reward label sft")
declare -A OVR=() SB=()

die() { echo "slurm/pipeline.sh: $*" >&2; exit 2; }
is_stage() { [[ -n ${RECIPE[$1]:-} ]]; }

run_dir=runs/pipeline; stages=reward,label,sft,evaluate; after=""; common_sbatch=""; dry=0
while (( $# )); do
  case $1 in
    --run-dir) run_dir=${2:?--run-dir needs a value}; shift 2 ;;
    --run-dir=*) run_dir=${1#*=}; shift ;;
    --stages) stages=${2:?--stages needs a value}; shift 2 ;;
    --stages=*) stages=${1#*=}; shift ;;
    --after) after=${2:?--after needs a job id}; shift 2 ;;
    --after=*) after=${1#*=}; shift ;;
    --sbatch) common_sbatch=${2?--sbatch needs a value}; shift 2 ;;
    --sbatch=*) common_sbatch=${1#*=}; shift ;;
    --sbatch-*)
      opt=${1#--sbatch-}
      if [[ $opt == *=* ]]; then st=${opt%%=*}; val=${opt#*=}; shift
      else st=$opt; val=${2?--sbatch-$st needs a value}; shift 2; fi
      is_stage "$st" || die "unknown stage in --sbatch-$st (stages: ${ALL[*]})"
      SB[$st]=$val ;;
    --dry-run) dry=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --*) die "unknown option $1" ;;
    *)
      ov=$1; shift
      prefix=${ov%%[!+~]*}; body=${ov#"$prefix"}          # keep Hydra's +, ++ and ~ in front
      key=${body%%=*}; head=${key%%.*}
      if [[ $head == model ]]; then                     # the shared backbone: reward and sft
        OVR[reward]+="${OVR[reward]:+$'\n'}$ov"; OVR[sft]+="${OVR[sft]:+$'\n'}$ov"
      elif is_stage "$head" && [[ $key == *.* ]]; then
        OVR[$head]+="${OVR[$head]:+$'\n'}$prefix${body#*.}"
      else
        die "override '$ov' names no stage: write <stage>.<key>=<value> (stages: ${ALL[*]}) or model.<key>=<value>"
      fi ;;
  esac
done

IFS=, read -ra wanted <<< "$stages"
(( ${#wanted[@]} )) || die "--stages is empty"
for st in "${wanted[@]}"; do is_stage "$st" || die "unknown stage '$st' (stages: ${ALL[*]})"; done
for st in "${!OVR[@]}"; do
  [[ ,$stages, == *,$st,* || $st == reward || $st == sft ]] || die "overrides for $st, which is not in --stages ($stages)"
done
cd "$(dirname "$0")/.."                                  # sbatch from the repository root (SLURM_SUBMIT_DIR)
[[ $run_dir == /* ]] || run_dir="$OLDPWD/$run_dir"
R=$run_dir
(( dry )) || mkdir -p "$R/slurm"

wiring() {  # the stage's inputs and outputs inside the run dir, one override per line
  case $1 in
    reward)   printf '%s\n' "run_dir=$R/reward" ;;
    label)    printf '%s\n' "rm=$R/reward/model" "output_dir=$R/label" ;;
    sft)      printf '%s\n' "run_dir=$R/sft" "data.train=[{format: canonical, path: $R/label/labeled.jsonl}]" ;;
    evaluate) printf '%s\n' "model.path=$R/sft/model" "rm=$R/reward/model" "output_dir=$R/evaluate" ;;
    steerlm2) printf '%s\n' "policy=$R/sft/model" "rm=$R/reward/model" "run_dir=$R/steerlm2" ;;
    ppo)      printf '%s\n' "policy=$R/sft/model" "rm=$R/reward/model" "run_dir=$R/ppo" \
                            "reward.standardize_from=$R/label/labeled.jsonl" ;;
  esac
}

declare -A JOB=()
for st in "${ALL[@]}"; do                                # pipeline order, whatever order --stages gave
  [[ ,$stages, == *,$st,* ]] || continue
  deps=()
  for dep in ${READS[$st]}; do [[ -n ${JOB[$dep]:-} ]] && deps+=("${JOB[$dep]}"); done
  (( ${#deps[@]} == 0 )) && [[ -n $after ]] && deps=("$after")
  args=(--parsable --job-name="steerlm-$st" --output="$R/slurm/$st-%j.out")
  (( ${#deps[@]} )) && args+=(--dependency="afterok:$(IFS=:; echo "${deps[*]}")" --kill-on-invalid-dep=yes)
  read -ra extra <<< "$common_sbatch"; args+=("${extra[@]}")
  read -ra extra <<< "${SB[$st]:-}"; args+=("${extra[@]}")
  mapfile -t ov < <(wiring "$st"; [[ -n ${OVR[$st]:-} ]] && printf '%s\n' "${OVR[$st]}")
  cmd=(sbatch "${args[@]}" "slurm/${RECIPE[$st]}.sbatch" "${ov[@]}")
  if (( dry )); then
    JOB[$st]="<$st>"; printf '%q ' "${cmd[@]}"; echo
  else
    id=$("${cmd[@]}") || die "sbatch failed for stage $st"
    JOB[$st]=${id%%;*}                                   # --parsable prints "id[;cluster]"
    echo "$st ${JOB[$st]}"
  fi
done
