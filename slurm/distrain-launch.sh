# shellcheck shell=bash
# The body every sbatch script of distrain shares: sourced by slurm/*.sh (renders of
# `distrain slurm render`) after their #SBATCH lines and settings. Not run on its own.
#
#   sbatch slurm/mobilenet.sh                             from the distrain checkout, or any directory:
#   sbatch /path/to/distrain/slurm/mobilenet.sh           JOB and DISTRAIN also looked for in the checkout
#   sbatch --export=ALL,DISTRAIN_RUN_DIR=runs/mobilenet/slurm-812 slurm/mobilenet.sh
#                                                         continue that run (a new job id)
#
# What it does, in the batch script (one process on the first node):
#   1. checks the job file, its overrides and the allocation (`distrain slurm check`): an invalid
#      job, or more tasks than the job's strategy can use, ends the job here with one line and
#      exit 2, before anything starts;
#   2. prints the run dir and where TensorBoard's logs are, with the `ssh -L` tunnel and the
#      `tensorboard --logdir ... --host 127.0.0.1` command to view them;
#   3. srun --kill-on-bad-exit=1 --distribution=block ... $DISTRAIN train JOB --run-dir RUN_DIR
#      [--set ...] (each task with SIGTERM/SIGUSR1 ignored until distrain's training handles them);
#   4. maps distrain's exit code (srun returns the largest code of its tasks, so 75 when every
#      task exits 75):
#        0        done;
#        75       preempted, backup written: `scontrol requeue`, then exit 0 (not a failure);
#        76       a peer was lost: `scontrol requeue` while SLURM_RESTART_COUNT < MAX_RESTARTS,
#                 else exit 76;
#        74       a file could not be written (disk full, over quota, I/O error): never requeued
#                 (a requeue would hit the same disk); the line says to free space, then continue;
#        other    passed through (1 failed, 2 bad input, e.g. no backup that verifies, 77 NaN loss,
#                 128+N a task killed by signal N: the line then names the signal and
#                 docs/troubleshooting.md).
#      A requeued job keeps its id, so it runs again in the same run dir and resumes from its backup.
#
# A sweep (`distrain slurm render --sweep`: SWEEP set, the script a job array) trains trial
# $SLURM_ARRAY_TASK_ID of the sweep in SWEEP/trial-NNN: in step 1 `distrain slurm check --sweep SWEEP
# --trial K` plans the sweep (SET, GRID, TRIALS), marks the trial running and names its run dir and
# its overrides, or says it is finished already (the task then ends here, exit 0); in step 3 srun
# trains it with the job's SET and the trial's overrides; before step 4 `distrain slurm record`
# writes how it ended into SWEEP/sweep.yaml. `scontrol requeue $SLURM_JOB_ID` requeues this array
# task alone (its own job id), which keeps its SLURM_ARRAY_TASK_ID and resumes its trial. A NaN
# loss (77) is the trial's result, recorded, and ends the task with 0.
#
# Settings it reads (the rendered script sets them): JOB, SET (array of key.path=value), RUNS_DIR,
# DISTRAIN, REQUEUE (1/0), MAX_RESTARTS, SRUN_ARGS (array); MODE=bench and BENCH_ARGS (array) in a
# `distrain slurm render --bench` script, which runs `distrain bench` in step 3 (run dir
# RUNS_DIR/NAME/bench-slurm-JOBID) and passes its exit code through in step 4; SWEEP, GRID (array of
# key=a,b) and TRIALS in a sweep's. From the environment: DISTRAIN_RUN_DIR (use this run dir instead
# of RUNS_DIR/NAME/slurm-JOBID; not for a sweep), DISTRAIN_TB_PORT (default 6006), DISTRAIN_PORT
# (the workers' base port; see docs/slurm.md).
#
# Exit codes: 0 done or requeued, 2 bad input (nothing started), else distrain's (see above).

# distrain_exit_line WHAT RC: "WHAT exited with RC", or when RC (128+N) says a task was killed by
# signal N, the line distrain.errors.signal_death gives (the signal, and docs/troubleshooting.md).
distrain_exit_line() {
  local what=$1 rc=$2 name why
  if ((rc <= 128 || rc >= 128 + 65)); then
    echo "$what exited with $rc"
    return 0
  fi
  name=SIG$(kill -l $((rc - 128)) 2>/dev/null) || name="signal $((rc - 128))"
  case $name in
    SIGSEGV | SIGABRT | SIGBUS | SIGILL | SIGFPE)
      why="a crash in TensorFlow or a library; TensorFlow 2.21's oneDNN crash (munmap_chunk(): invalid pointer) goes away with TF_ENABLE_ONEDNN_OPTS=0" ;;
    SIGKILL) why="killed from outside (out of memory, scancel, the time limit?)" ;;
    *) why="stopped from outside" ;;
  esac
  echo "a task died by $name (exit $rc): $why; see docs/troubleshooting.md#a-run-dies-by-a-signal"
}

distrain_launch() {
  local me=distrain-launch
  local job=${JOB:-} runs_dir=${RUNS_DIR:-runs} distrain=${DISTRAIN:-distrain}
  local requeue=${REQUEUE:-1} max_restarts=${MAX_RESTARTS:-3} restarts=${SLURM_RESTART_COUNT:-0}
  local mode=${MODE:-train}
  local sweep=${SWEEP:-} trials=${TRIALS:-} trial=${SLURM_ARRAY_TASK_ID:-}
  local -a set_args=() srun_args=() bench_args=() where_args=(--runs-dir "$runs_dir") trial_sets=()
  local kv

  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "$me: not inside a SLURM job; submit the script with sbatch" >&2
    return 2
  fi
  if [[ -z $job ]]; then
    echo "$me: JOB is not set; the script must set JOB=path/to/job.yaml before sourcing $me" >&2
    return 2
  fi
  # The checkout this launcher is in: a course job (JOB=jobs/cnn.yaml) and its .venv are found there
  # when sbatch ran in another directory (a user's project).
  local checkout
  checkout=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ ! -f $job && $job != /* && -f $checkout/$job ]]; then
    job=$checkout/$job
  fi
  if [[ ! -f $job ]]; then
    echo "$me: JOB=$job: no such job file (relative paths are from $PWD, where sbatch ran, or $checkout)" >&2
    return 2
  fi
  if [[ $distrain == distrain ]] && ! command -v distrain >/dev/null 2>&1 && [[ -x $checkout/.venv/bin/distrain ]]; then
    distrain=$checkout/.venv/bin/distrain  # scripts/setup.sh's venv, not on PATH
  fi
  if ! command -v "$distrain" >/dev/null 2>&1; then
    echo "$me: DISTRAIN=$distrain: command not found on $(hostname); submit with DISTRAIN=/path/to/venv/bin/distrain" >&2
    return 2
  fi
  if [[ $mode != train && $mode != bench ]]; then
    echo "$me: MODE=$mode: expected train or bench" >&2
    return 2
  fi
  if [[ ! $max_restarts =~ ^[0-9]+$ ]]; then
    echo "$me: MAX_RESTARTS=$max_restarts: expected a non-negative integer" >&2
    return 2
  fi
  if [[ -n $sweep ]]; then
    if [[ $mode != train ]]; then
      echo "$me: SWEEP=$sweep with MODE=$mode: a sweep trains its trials (MODE=train)" >&2
      return 2
    fi
    if [[ -z $trial ]]; then
      echo "$me: SWEEP=$sweep, but this is no task of a job array (SLURM_ARRAY_TASK_ID is unset); submit the" \
           "script with sbatch, whose #SBATCH --array line makes one task per trial" >&2
      return 2
    fi
    where_args=(--sweep "$sweep" --trial "$trial")
    for kv in ${GRID[@]+"${GRID[@]}"}; do where_args+=(--grid "$kv"); done
    if [[ -n $trials ]]; then where_args+=(--trials "$trials"); fi
  fi
  for kv in ${SET[@]+"${SET[@]}"}; do set_args+=(--set "$kv"); done
  srun_args=(${SRUN_ARGS[@]+"${SRUN_ARGS[@]}"})
  bench_args=(${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"})

  # 1. The job and the allocation, before anything starts (a sweep: the trial, marked running).
  local info rc strategy="" tensorboard="" run_dir="" trial_line="" done_line=""
  local nodes=${SLURM_JOB_NUM_NODES:-1}
  local tasks=${SLURM_NTASKS:-$nodes}
  local -a mode_args=()
  if [[ $mode == bench ]]; then mode_args=(--bench); fi
  rc=0
  # distrain decides the run dir (RunDir.for_slurm_launcher): $DISTRAIN_RUN_DIR, else
  # RUNS_DIR/NAME/slurm-JOBID (bench-slurm-JOBID for a benchmark), keyed by the job id so a
  # requeued job finds its backup; a sweep's trial: SWEEP/trial-NNN.
  info=$("$distrain" slurm check "$job" --nodes "$nodes" --tasks "$tasks" \
         --gpus-per-node "${SLURM_GPUS_ON_NODE:-0}" "${where_args[@]}" ${mode_args[@]+"${mode_args[@]}"} \
         ${set_args[@]+"${set_args[@]}"}) || rc=$?
  if ((rc == 2)); then
    return 2  # distrain printed the one-line reason
  elif ((rc != 0)); then
    echo "$me: '$distrain slurm check' failed with exit $rc; not started" >&2
    return "$rc"
  fi
  local line key value
  while IFS= read -r line; do
    key=${line%%=*} value=${line#*=}  # a value may hold '=' (set=train.schedule={name: step})
    case $key in
      strategy) strategy=$value ;;
      tensorboard) tensorboard=$value ;;
      run_dir) run_dir=$value ;;
      trial) trial_line=$value ;;
      set) trial_sets+=(--set "$value") ;;
      done) done_line=$value ;;
    esac
  done <<<"$info"

  # 2. The run dir and TensorBoard (a sweep's: the sweep dir, every trial in the HParams dashboard).
  local tb_port=${DISTRAIN_TB_PORT:-6006} login=${SLURM_SUBMIT_HOST:-LOGIN_NODE}
  local id="job $SLURM_JOB_ID${SLURM_RESTART_COUNT:+ (restart $SLURM_RESTART_COUNT)}" logdir=$run_dir/tensorboard
  if [[ -n $sweep ]]; then
    id="job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_$trial (id $SLURM_JOB_ID${SLURM_RESTART_COUNT:+, restart $SLURM_RESTART_COUNT})"
    logdir=${run_dir%/*}
  fi
  echo "$me: $id: $job, $tasks task(s) on ${SLURM_JOB_NODELIST:-$nodes node(s)}, strategy $strategy"
  if [[ -n $sweep ]]; then
    echo "$me: $trial_line of the sweep in ${run_dir%/*}"
    if [[ -n $done_line ]]; then
      echo "$me: $done_line: nothing to train"
      return 0
    fi
  fi
  echo "$me: run dir $run_dir"
  if [[ $mode == bench ]]; then
    :  # a benchmark writes no TensorBoard logs
  elif [[ $tensorboard == true ]]; then
    echo "$me: TensorBoard logs: $logdir"
    echo "$me:   on $login: tensorboard --logdir $logdir --host 127.0.0.1 --port $tb_port"
    echo "$me:   on your machine: ssh -N -L $tb_port:127.0.0.1:$tb_port ${USER:-$(id -un)}@$login" \
         "then open http://127.0.0.1:$tb_port"
  else
    echo "$me: TensorBoard: off for this job (logging.tensorboard: false)"
  fi
  if [[ -e $run_dir/backup/checkpoint ]]; then
    echo "$me: resuming from $run_dir/backup"
  fi

  # 3. Every task runs the same command; distrain finds its rank in SLURM's variables.
  # srun does not take --cpus-per-task from the batch environment in SLURM 22.05: pass it on.
  # The tasks start with SIGTERM and SIGUSR1 ignored; distrain handles both while it trains (an
  # agreed stop, a backup, exit 75). Why: when the first task exits 75, --kill-on-bad-exit makes
  # srun SIGTERM the others, which have taken the same decision but are still exiting; killed by
  # that signal they would make srun report 143 instead of 75 and the job would not be requeued.
  # Outside training the signals are then ignored; SLURM's SIGKILL still follows after KillWait.
  export PYTHONUNBUFFERED=1
  local -a command=("$distrain" train "$job" --run-dir "$run_dir")
  if [[ $mode == bench ]]; then
    command=("$distrain" bench "$job" --run-dir "$run_dir" ${bench_args[@]+"${bench_args[@]}"})
  fi
  rc=0
  srun --kill-on-bad-exit=1 --distribution=block \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} ${srun_args[@]+"${srun_args[@]}"} \
    bash -c 'trap "" TERM USR1; exec "$@"' distrain-task \
    "${command[@]}" ${set_args[@]+"${set_args[@]}"} ${trial_sets[@]+"${trial_sets[@]}"} || rc=$?

  # 4. distrain's exit code (a sweep's trial: recorded first).
  local resume="sbatch --export=ALL,DISTRAIN_RUN_DIR=$run_dir <this script>" ended
  if [[ -n $sweep ]]; then
    resume="sbatch --array=$trial <this script> (it resumes the trial from its backup)"
    if ended=$("$distrain" slurm record "${run_dir%/*}" --trial "$trial" --exit-code "$rc"); then
      echo "$me: $ended"
    else
      echo "$me: could not record the end of the trial in ${run_dir%/*}/sweep.yaml (the line above says why);" \
           "the next submission of the sweep trains it again, from its backup" >&2
    fi
    if ((rc == 77)); then
      echo "$me: a NaN loss is the trial's result (its hyperparameters diverge), recorded; the task ends with 0"
      return 0
    fi
  fi
  if [[ $mode == bench ]]; then
    if ((rc == 0)); then
      echo "$me: benchmark done; run dir $run_dir"
    else
      echo "$me: $(distrain_exit_line "distrain bench" "$rc"); run dir $run_dir" >&2
    fi
    return "$rc"
  fi
  local why
  case $rc in
    0) echo "$me: done; run dir $run_dir"; return 0 ;;
    75) why="preempted (exit 75), backup written" ;;
    74)
      echo "$me: a file of the run could not be written (exit 74: disk full, over quota or failing; the line" \
           "above names it); not requeued, since a requeue would meet the same disk. The previous backup is" \
           "intact: free space under $run_dir (or raise the quota), then continue with: $resume" >&2
      return "$rc"
      ;;
    76)
      why="a peer was lost (exit 76)"
      if ((restarts >= max_restarts)); then
        echo "$me: $why; not requeued: the job has restarted $restarts time(s) (MAX_RESTARTS=$max_restarts)." \
             "Continue it with: $resume" >&2
        return "$rc"
      fi
      ;;
    *) echo "$me: $(distrain_exit_line distrain "$rc"); run dir $run_dir" >&2; return "$rc" ;;
  esac
  if [[ $requeue != 1 ]]; then
    echo "$me: $why; REQUEUE=$requeue, so the job ends here." \
         "Continue it with: $resume" >&2
    return "$rc"
  fi
  echo "$me: $why; requeueing job $SLURM_JOB_ID: it resumes from $run_dir/backup"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "$me: scontrol requeue $SLURM_JOB_ID failed." \
         "Continue the run with: $resume" >&2
    return "$rc"
  fi
  # Requeued: SLURM ends this run of the script itself; exit 0 if it has not yet, so the run is
  # not recorded as a failure.
  return 0
}

distrain_launch
exit $?
