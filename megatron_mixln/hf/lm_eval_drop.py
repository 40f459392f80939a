"""lm-evaluation-harness scores of an HF model, and their change when one layer is removed (the Mix-LN
paper's performance drop, dP(l) = P(without layer l) - P(full model), on lm-eval tasks)."""
from __future__ import annotations

import contextlib

import torch


def layer_positions(hf_model) -> list[str]:
    """Per-layer norm positions of a loaded HF model (stock LLaMA: all pre)."""
    cfg = hf_model.config
    return list(getattr(cfg, "norm_positions", None) or ["pre"] * cfg.num_hidden_layers)


@contextlib.contextmanager
def without_layer(hf_model, index: int):
    """Temporarily drop decoder layer `index` (0-based). The others keep their own position and scales;
    attention layer indices are renumbered so the KV cache stays consistent."""
    base = hf_model.model
    layers, n = base.layers, hf_model.config.num_hidden_layers
    kept = [layer for i, layer in enumerate(layers) if i != index]
    old_idx = [layer.self_attn.layer_idx for layer in kept]
    base.layers = torch.nn.ModuleList(kept)
    hf_model.config.num_hidden_layers = n - 1
    for i, layer in enumerate(kept):
        layer.self_attn.layer_idx = i
    try:
        yield hf_model
    finally:
        for layer, idx in zip(kept, old_idx):
            layer.self_attn.layer_idx = idx
        base.layers = layers
        hf_model.config.num_hidden_layers = n


def task_manager(tasks: list[str], include_path: str | None = None):
    """An lm-eval TaskManager; lm-eval's own task catalogue (thousands of YAML files, seconds to index) is
    only indexed when some task is not found under include_path."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=include_path)


def lm_eval_scores(hf_model, tokenizer, tasks: list[str], include_path: str | None = None, limit=None,
                   batch_size: int = 8, log_samples: bool = False, manager=None) -> dict:
    """{"results": {task: {metric: value}}, "samples": ...} from lm_eval.simple_evaluate on an in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=hf_model, tokenizer=tokenizer, batch_size=batch_size)
    manager = manager or task_manager(tasks, include_path)
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager,
                          limit=limit, log_samples=log_samples, bootstrap_iters=0, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    results = {task: {k.split(",")[0]: v for k, v in metrics.items()
                      if isinstance(v, (int, float)) and "_stderr" not in k and k != "sample_len"}
               for task, metrics in out["results"].items()}
    return {"results": results, "samples": out.get("samples") if log_samples else None}


def lm_eval_layer_drop(hf_model, tokenizer, tasks: list[str], include_path: str | None = None, limit=None,
                       batch_size: int = 8) -> dict:
    """Scores of the full model and of the model without each layer; `delta` = without - full, per metric."""
    hf_model.config.use_cache = False
    manager = task_manager(tasks, include_path)
    full = lm_eval_scores(hf_model, tokenizer, tasks, include_path, limit, batch_size, manager=manager)["results"]
    rows = []
    for i, position in enumerate(layer_positions(hf_model)):
        with without_layer(hf_model, i):
            scores = lm_eval_scores(hf_model, tokenizer, tasks, include_path, limit, batch_size,
                                    manager=manager)["results"]
        delta = {t: {m: v - full[t][m] for m, v in ms.items() if m in full.get(t, {})} for t, ms in scores.items()}
        rows.append({"layer": i + 1, "position": position, "scores": scores, "delta": delta})
    return {"full": full, "layers": rows}
