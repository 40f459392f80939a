"""Run the training entry point and kill -9 it at one point of the save of iter_0000004 (a test helper).

    python checkpoint_fault_job.py POINT [pretrain flags...]

POINT: model_states  (DeepSpeed's model-states file written, optimizer states not yet)
       optimizer_half (the optimizer-states file half written)
       manifest      (every shard and mixln_meta.json written, the manifest not yet)
"""
import io
import os
import signal
import sys

TAG = "iter_0000004"


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from megatron_mixln.checkpoint import save as checkpoint

    real_save = TorchCheckpointEngine.save
    if point == "model_states":
        def save(self, state_dict, path):
            real_save(self, state_dict, path)
            if TAG in path and "model_states" in path:
                die()
        TorchCheckpointEngine.save = save
    elif point == "optimizer_half":
        def save(self, state_dict, path):
            if TAG in path and "optim_states" in path:
                buf = io.BytesIO()
                torch.save(state_dict, buf)
                with open(path, "wb") as fh:
                    fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                die()
            real_save(self, state_dict, path)
        TorchCheckpointEngine.save = save
    elif point == "manifest":
        real_manifest = checkpoint.write_manifest_shared

        def write_manifest_shared(tag_dir):
            if TAG in tag_dir:
                die()
            real_manifest(tag_dir)
        checkpoint.write_manifest_shared = write_manifest_shared
    else:
        raise SystemExit(f"unknown point {point!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    from megatron_mixln.training.main import main

    sys.exit(main(sys.argv[2:]))
