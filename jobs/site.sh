#!/usr/bin/env bash
# jobs/site.sh - this cluster's settings, in one place. Sourced by jobs/submit.sh (which
# passes them to sbatch) and by every job script at run time (modules, Python, launcher).
# Edit the defaults here, or override any of them in the environment when submitting:
#   PARTITION=a100 ACCOUNT=proj42 TIME=12:00:00 jobs/submit.sh jobs/ucf101_vgg8_skip_add.sbatch

# -- scheduler ---------------------------------------------------------------------------
PARTITION=${PARTITION:-gpu}          # partition of the GPU jobs
CPU_PARTITION=${CPU_PARTITION:-cpu}  # partition of the CPU-only jobs (*_cpu.sbatch, data_prep)
ACCOUNT=${ACCOUNT:-}                 # sbatch --account (empty: the user's default account)
TIME=${TIME:-24:00:00}               # wall-clock limit of one training job (it requeues itself)
DATA_TIME=${DATA_TIME:-08:00:00}     # wall-clock limit of a data_prep job
SIGNAL_LEAD=${SIGNAL_LEAD:-300}      # seconds before the limit: SIGUSR1 -> checkpoint, requeue
EXTRA_SBATCH=${EXTRA_SBATCH:-}       # more sbatch options, e.g. "--qos=long --constraint=a100"

# -- software ----------------------------------------------------------------------------
SSMPI_MODULES=${SSMPI_MODULES:-}     # e.g. "gcc/12.2 openmpi/4.1.5 cuda/12.2 python/3.11"
SSMPI_VENV=${SSMPI_VENV:-}           # virtual environment with ssmpi and mpi4py (optional)
SSMPI_PYTHON=${SSMPI_PYTHON:-python} # interpreter (after modules and venv)
# srun --mpi=$SRUN_MPI (pmi2 for MPICH-family MPIs; pmix for most Open MPI builds), or
# mpiexec (the MPI's own launcher; under SLURM it starts its daemons with srun itself)
SSMPI_LAUNCHER=${SSMPI_LAUNCHER:-srun}
SRUN_MPI=${SRUN_MPI:-pmi2}
