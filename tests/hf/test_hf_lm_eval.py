"""lm-evaluation-harness on an export, through lm-eval's Python API exactly as `lm_eval --model hf
--model_args pretrained=DIR,trust_remote_code=True --tasks tiny_mc --include_path TASKS` runs it."""
import numpy as np
import pytest

from hf_testlib import QUESTIONS, hand_accuracy, hand_logliks, run_tool, save_tiny, write_mc_task


def test_lm_eval_accuracy_matches_hand_computed_log_likelihoods(tmp_path, spm_model):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1)
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                            "--tokenizer", spm_model)
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    # answers: the model's own pick for the first three questions, another choice for the last two
    picks = [int(np.argmax(hand_logliks(model, tok, q, c))) for q, c in QUESTIONS]
    answers = picks[:3] + [(p + 1) % len(c) for p, (_, c) in zip(picks[3:], QUESTIONS[3:])]
    tasks = write_mc_task(tmp_path / "tasks", answers)
    out = simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},trust_remote_code=True",
                          tasks=["tiny_mc"], task_manager=TaskManager(include_path=tasks, include_defaults=False),
                          device="cpu", batch_size=2, log_samples=True, bootstrap_iters=0)
    acc, acc_norm, lls = hand_accuracy(model, tok, answers)
    assert acc == pytest.approx(0.6)
    res = out["results"]["tiny_mc"]
    assert res["acc,none"] == pytest.approx(acc) and res["acc_norm,none"] == pytest.approx(acc_norm)
    for sample in out["samples"]["tiny_mc"]:
        got = [r[0] for r in sample["filtered_resps"]]
        assert got == pytest.approx(lls[sample["doc_id"]], abs=1e-4)


def test_rolling_loglikelihood_scores_each_document_after_eod(tmp_path, spm_model):
    """`lm_eval --model hf` defaults: a perplexity task's document is scored after the end-of-document id the
    training documents followed (sentencepiece's bos id 3 was never trained), with the training ids."""
    import sentencepiece as spm
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1)
    code, _, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                            "--tokenizer", spm_model)
    assert code == 0, err
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    texts = ["Pretraining  runs on\tmany processes.", "The norm of every layer sits before the attention.",
             " <s> is text here \ufb01ne"]
    lm = HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, device="cpu", batch_size=2)
    assert lm.prefix_token_id == sp.eos_id() == 1
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                   disable_tqdm=True)
    for text, ll in zip(texts, got):
        ids = sp.encode(text)
        assert 0 < len(ids) < config.seq_length
        with torch.no_grad():
            for prefix, same in ((sp.eos_id(), True), (sp.bos_id(), False)):
                logp = torch.log_softmax(model(torch.tensor([[prefix] + ids])).double()[0, :-1], -1)
                want = logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
                assert (ll == pytest.approx(want, abs=1e-3)) == same, (text, prefix, ll, want)
