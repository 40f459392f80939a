"""Multi-process jobs of the HF tests (spawn_testlib.run_spawned; gloo over loopback only)."""
from __future__ import annotations

import torch

ZERO3_TP2_CASE = dict(norm_position="post,peri,lns,pre", normalization="LayerNorm", num_query_groups=2)


def zero3_tp2_save_job(rank, world_size, tmpdir, save_dir):
    """TP=2 with ZeRO-3 (every TP shard partitioned by DeepSpeed): build, shard, save a checkpoint as the
    trainer does (model_config in the client state). Every rank builds the same seeded model."""
    import deepspeed

    from hf_testlib import tiny_model
    from megatron_mixln.parallel import apply_tensor_parallel, initialize_model_parallel

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skip a 30 s op build on CPU
    deepspeed.init_distributed(dist_backend="gloo")
    state = initialize_model_parallel(2, 1)
    config, model = tiny_model(**ZERO3_TP2_CASE)
    apply_tensor_parallel(model, state)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), mpu=state.mpu,
        config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
                "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9})
    engine.save_checkpoint(save_dir, tag="iter_0000001", client_state={"mixln": {"model_config": config.to_dict()}})
    return {"partitioned": all(hasattr(p, "ds_id") for p in engine.module.parameters())}
