"""A DFlash draft trained here on SmolLM2 and exported by draftcache, served by vLLM's CPU build.

Checks: the mask token is chosen by the trainer's rule (``trainer/mask_token.py``) and its
SmolLM2 embedding row is non-zero; vLLM loads the export as ``method: "dflash"``; every drafter tensor vLLM loaded equals
the export (snapshot taken right after ``load_weights``: the CPU backend then repacks linear
weights and empties ``.weight``); the embeddings and lm_head it uses are the target's; vLLM's
speculative greedy output equals plain greedy fp32; vLLM's acceptance counters equal ours, with
tokens accepted past the first block position (the draft reads its anchor and context).

vLLM CPU bug worked around (docs/DFLASH.md): the context-K RMSNorm reads only layer 0's
``k_norm`` weight, so every layer's ``k_norm`` is frozen at the same value (ones) in training.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: its modules are reachable

import pytest
import torch

from draftcache.data.vocab import supervised_token_counts
from draftcache.targets import HFDFlashTargetModel, default_dflash_layer_ids
from draftcache.trainer.dflash.config import DFlashDraftConfig
from draftcache.trainer.dflash.export import export_dflash_draft
from draftcache.trainer.dflash.loss import dflash_loss, sample_anchors
from draftcache.trainer.mask_token import MaskTokenChoice, choose_mask_token, tokenizer_special_ids
from draftcache.trainer.dflash.model import DFlashDraftModel
from draftcache.trainer.dflash.speculative import dflash_speculative_generate
from draftcache.trainer.speculative import SpecDecodeStats, greedy_generate

BLOCK = 4
DRAFT_LAYERS = 2
MAX_NEW = 32
QUESTIONS = ["What is the capital of France?", "Write a short poem about the sea.",
             "Give me three tips for learning to cook."]


def _mask_token(tokenizer, model, rows: list[torch.Tensor], masks: list[torch.Tensor]) -> MaskTokenChoice:
    """The trainer's rule on SmolLM2 and the replies trained on."""
    embed = model.get_input_embeddings().weight
    return choose_mask_token(embeddings=embed, supervised_counts=supervised_token_counts(rows, masks, embed.shape[0]),
                             rms_norm_eps=model.config.rms_norm_eps, special_ids=tokenizer_special_ids(tokenizer),
                             tokenizer_mask_id=tokenizer.mask_token_id, token_name=tokenizer.convert_ids_to_tokens)


def _train_draft(target: HFDFlashTargetModel, rows: list[torch.Tensor], prompt_lens: list[int],
                 mask_token_id: int) -> DFlashDraftModel:
    """A 2-layer draft trained briefly on the target's own greedy replies, packed in one row."""
    layer_ids = default_dflash_layer_ids(target.num_layers, DRAFT_LAYERS)
    config = DFlashDraftConfig.from_target_config(target.model.config, target_layer_ids=layer_ids,
                                                  mask_token_id=mask_token_id, num_hidden_layers=DRAFT_LAYERS,
                                                  block_size=BLOCK)
    torch.manual_seed(0)
    draft = DFlashDraftModel.from_target(config, target.model)
    for layer in draft.layers:  # the vLLM CPU k_norm bug: keep every layer's k_norm equal (ones), as --freeze-k-norm
        layer.self_attn.k_norm.weight.requires_grad_(False)
    feats, argmax, masks = [], [], []
    for row, plen in zip(rows, prompt_lens):
        fwd = target.forward_capture(row.view(1, -1))
        feats.append(fwd.aux_hidden_states[0])
        argmax.append(fwd.logits[0].argmax(-1))
        mask = torch.zeros_like(row)
        mask[plen:] = 1
        masks.append(mask)
    ids = torch.cat(rows).view(1, -1)
    hidden, target_argmax, loss_mask = torch.cat(feats)[None], torch.cat(argmax)[None], torch.cat(masks)[None]
    seq_lens = torch.tensor([[len(r) for r in rows]])
    opt = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        anchors, valid = sample_anchors(loss_mask, num_anchors=48, seq_lens=seq_lens, generator=gen)
        out = dflash_loss(draft, target_hidden=hidden, input_ids=ids, target_argmax=target_argmax,
                          loss_mask=loss_mask, anchor_positions=anchors, anchor_valid=valid, seq_lens=seq_lens)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return draft.eval()


@pytest.fixture(scope="module")
def served(smollm2_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.model_executor.models.qwen3_dflash import DFlashQwen3ForCausalLM

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    target = HFDFlashTargetModel(model, default_dflash_layer_ids(30, DRAFT_LAYERS))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    greedy = [greedy_generate(model, torch.tensor(p), MAX_NEW) for p in prompts]
    rows = [torch.tensor(p + g) for p, g in zip(prompts, greedy)]
    mask = _mask_token(tokenizer, model, rows, [torch.tensor([0] * len(p) + [1] * len(g)) for p, g in zip(prompts, greedy)])
    draft = _train_draft(target, rows, [len(p) for p in prompts], mask.token_id)
    ours = SpecDecodeStats(draft_tokens=BLOCK - 1)
    our_outputs = [dflash_speculative_generate(target, draft, torch.tensor(p), max_new_tokens=MAX_NEW, stats=ours)
                   for p in prompts]
    export_dir = export_dflash_draft(draft, tmp_path_factory.mktemp("dflash") / "draft")

    loaded: dict[str, torch.Tensor] = {}
    original = DFlashQwen3ForCausalLM.load_weights

    def snapshot(self, weights):
        result = original(self, weights)
        loaded.update({n: p.detach().clone() for n, p in self.named_parameters()})
        return result

    DFlashQwen3ForCausalLM.load_weights = snapshot
    try:
        llm = LLM(model=str(smollm2_dir), dtype="float32", enforce_eager=True, max_model_len=512,
                  disable_log_stats=False, seed=0,
                  speculative_config={"method": "dflash", "model": str(export_dir),
                                      "num_speculative_tokens": BLOCK - 1})
    finally:
        DFlashQwen3ForCausalLM.load_weights = original
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))
    metrics = {m.name: m for m in llm.get_metrics()}
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    yield {"mask": mask, "draft": draft, "model": model, "greedy": greedy, "ours": ours, "our_outputs": our_outputs,
           "vllm_outputs": [list(r.outputs[0].token_ids) for r in results], "metrics": metrics,
           "loaded": loaded, "drafter": runner.drafter.model, "target_runner_model": runner.model}
    del llm


def test_the_chosen_mask_row_is_not_zero(served):
    mask, model = served["mask"], served["model"]
    print(f"\nmask token {mask.token_id} ({mask.token!r}, {mask.rule}), row RMS {mask.row_rms:.4f}")
    row = model.get_input_embeddings().weight[mask.token_id]
    assert row.pow(2).mean() > model.config.rms_norm_eps
    assert served["draft"].config.mask_token_id == mask.token_id


def test_our_block_decoding_is_lossless_and_accepts_past_the_first_position(served):
    assert served["our_outputs"] == served["greedy"]
    per_pos = served["ours"].num_accepted_tokens_per_pos
    assert per_pos[0] > 0 and per_pos[1] > 0, per_pos  # a draft ignoring its context accepts only at position 1


def test_vllm_loaded_every_drafter_tensor_from_the_export(served):
    draft, loaded = served["draft"], served["loaded"]
    ours = draft.state_dict()
    target_layers = 30  # vLLM names draft layer i "layers.{i + num_target_layers}"
    expected: dict[str, torch.Tensor] = {
        "model.fc.weight": ours["fc.weight"], "model.hidden_norm.weight": ours["hidden_norm.weight"],
        "model.norm.weight": ours["norm.weight"],
    }
    for i in range(DRAFT_LAYERS):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        expected[dst + "self_attn.qkv_proj.weight"] = torch.cat(
            [ours[src + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        expected[dst + "mlp.gate_up_proj.weight"] = torch.cat(
            [ours[src + "mlp.gate_proj.weight"], ours[src + "mlp.up_proj.weight"]])
        for name in ("self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
                     "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
            expected[dst + name] = ours[src + name]
    names = {n.replace(f"layers.{target_layers + i}.", f"layers.{i}.") for n in loaded for i in range(DRAFT_LAYERS)
             if f"layers.{target_layers + i}." in n} | {n for n in loaded if ".layers." not in n}
    renamed = {}
    for n, t in loaded.items():
        for i in range(DRAFT_LAYERS):
            n = n.replace(f"layers.{target_layers + i}.", f"layers.{i}.")
        renamed[n] = t
    assert names, "the snapshot of vLLM's drafter is empty"
    unexpected = sorted(set(renamed) - set(expected) - {"model.mask_embedding", "model.embed_tokens.weight",
                                                         "lm_head.weight"})
    assert not unexpected, unexpected
    for name, value in expected.items():
        assert name in renamed, f"vLLM's drafter has no {name}"
        assert torch.equal(renamed[name], value), name
    # no embed_tokens / lm_head in the export: vLLM shares the target's, which the draft trained with
    drafter = served["drafter"]
    assert drafter.model.embed_tokens is served["target_runner_model"].model.embed_tokens
    assert torch.equal(draft.embed_tokens.weight, served["model"].get_input_embeddings().weight)


def test_vllm_dflash_output_equals_plain_greedy(served):
    assert served["vllm_outputs"] == served["greedy"]


def test_vllm_acceptance_counters_equal_ours(served):
    metrics, ours = served["metrics"], served["ours"]
    print(f"\nours: drafts {ours.num_drafts}, draft tokens {ours.num_draft_tokens}, accepted {ours.num_accepted_tokens}, "
          f"per position {ours.num_accepted_tokens_per_pos}")
    assert metrics["vllm:spec_decode_num_drafts"].value == ours.num_drafts
    assert metrics["vllm:spec_decode_num_draft_tokens"].value == ours.num_draft_tokens
    assert metrics["vllm:spec_decode_num_accepted_tokens"].value == ours.num_accepted_tokens
    assert list(metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values) == ours.num_accepted_tokens_per_pos
    assert ours.num_accepted_tokens_per_pos[1] > 0
