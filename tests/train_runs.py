"""`tcore train` as a process, shared by the training tests: the command line of a short
run and of a two-process torchrun run."""
import subprocess
import sys


STEPS = 6
FAST = ["train.log_every=1", "model.head.prototypes=256", "data.batch_size_per_gpu=4"]
# The reference's stochastic depth: the resumed run must restore the RNG it draws from.
DROP_PATH = ["model.drop_path=0.1"]


def train_command(shards, out, *extra):
    return [sys.executable, "-m", "tcore.cli", "train", "--config", "tiny_cpu", "--data",
            str(shards), "--output", str(out), "--max-steps", str(STEPS),
            "--checkpoint-every", "2", "--no-progress", *FAST, *extra]


def torchrun_train(shards, out, *extra):
    """`--standalone`: a free rendezvous port of its own, so that no other run on the host
    (another checkout's tests, a port still in TIME_WAIT) can take it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               "2", "-m", "tcore.cli", "train", "--config", "tiny_cpu",
               "--data", str(shards), "--output", str(out), "--checkpoint-every", "2",
               "--no-progress", *FAST, *DROP_PATH, "data.num_threads=1", *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
