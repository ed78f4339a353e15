"""``draftcache eval``: real acceptance length and speed of a draft against its target.

For each prompt (the conversation up to its first assistant turn, ending with a user turn, rendered
with the target's chat template or ``--chat-template`` and the generation prompt; records without
an assistant turn are prompts as they are, so a prompts-only file works), the target decodes
``max_new_tokens`` greedily twice in the same process: plainly (one forward per token, KV cache)
and speculatively with the draft. Reports the acceptance length tau (tokens emitted per verify
forward, after truncation at EOS and max_new_tokens), the raw counters an engine keeps (drafts,
draft tokens, accepted tokens, accepted per position, counted as vLLM counts them, and vLLM's mean
acceptance length from them), both speeds, and whether every speculative output equalled the
plain greedy one (it must).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jinja2
import torch

from draftcache.data import ChatTokenizer, SkipCounts
from draftcache.targets import HFDFlashTargetModel, HFEagle3TargetModel
from draftcache.trainer.dflash.export import block_draft_method, load_exported_dflash_draft
from draftcache.trainer.dflash.speculative import dflash_speculative_generate
from draftcache.trainer.eagle3.export import is_peagle_export, load_exported_draft
from draftcache.trainer.eagle3.speculative import speculative_generate
from draftcache.trainer.speculative import SpecDecodeStats, greedy_generate, timed

__all__ = ["EvalPrompts", "EvalReport", "evaluate_draft", "load_eval_prompts", "prompt_ids_from_conversations"]


@dataclass
class EvalReport:
    """``tau`` is what the user gets (emitted tokens per verify step); ``stats`` holds the raw,
    engine-comparable counters (see :class:`~draftcache.trainer.speculative.SpecDecodeStats`)."""

    num_prompts: int
    draft_tokens: int
    tau: float
    acceptance_rates: list[float]
    tokens: int
    greedy_tokens_per_s: float
    spec_tokens_per_s: float
    mismatches: int
    skipped: dict[str, int] = field(default_factory=dict)  # records read but not used as prompts, by reason
    stats: SpecDecodeStats | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # [num_prompts] generated ids (speculative)

    @property
    def speedup(self) -> float:
        return self.spec_tokens_per_s / max(self.greedy_tokens_per_s, 1e-9)

    def _engine_lines(self) -> list[str]:
        if self.stats is None:
            return []
        st = self.stats
        return [f"engine counters    drafts {st.num_drafts}, draft tokens {st.num_draft_tokens}, accepted "
                f"{st.num_accepted_tokens}, accepted per position {st.num_accepted_tokens_per_pos}",
                f"engine mean length {st.mean_acceptance_length:.3f} (vLLM's 1 + accepted / drafts, before truncation)"] + (
                [f"drafter forwards   {st.draft_forwards_per_round:.2f} per verify round ({st.draft_forwards} in all)"]
                if st.draft_forwards else [])

    def format(self) -> str:
        rates = " ".join(f"{r:.2f}" for r in self.acceptance_rates)
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return "\n".join([
            f"prompts            {self.num_prompts} ({self.tokens} generated tokens each way)",
            f"skipped records    {skipped}",
            f"draft tokens K     {self.draft_tokens}",
            f"acceptance length  tau = {self.tau:.3f} emitted tokens per verify step (accepted + bonus, cut at EOS / max-new-tokens)",
            *self._engine_lines(),
            f"accept rate by pos {rates} (accepted at position i / drafts)",
            f"greedy             {self.greedy_tokens_per_s:.1f} tok/s",
            f"speculative        {self.spec_tokens_per_s:.1f} tok/s ({self.speedup:.2f}x)",
            f"lossless           {'yes' if self.mismatches == 0 else f'NO: {self.mismatches} prompts differ'}",
        ])


def prompt_ids_from_conversations(conversations, tokenizer, num_prompts: int,
                                  skipped: SkipCounts | None = None) -> list[list[int]]:
    """Token ids of the first ``num_prompts`` prompts: each conversation's ``prompt_messages()``
    rendered with ``tokenizer``'s chat template and the generation prompt. Conversations without a
    user turn (``no_user_turn``) or that the template refuses (``template_error``) are passed over
    and counted in ``skipped``; reading stops once ``num_prompts`` prompts are built."""
    chat = ChatTokenizer(tokenizer, None)  # a template that fails a plain chat is refused here
    skipped = skipped if skipped is not None else SkipCounts()
    prompts = []
    for conv in conversations:
        if not conv.prompt_messages():
            skipped.add("no_user_turn", conv.source)
            continue
        try:
            prompts.append(chat.encode_prompt(conv))
        except jinja2.TemplateError:
            skipped.add("template_error", conv.source)
            continue
        if len(prompts) >= num_prompts:
            break
    if not prompts:
        raise ValueError(f"no prompt could be built ({skipped.summary()}); --input-data needs records with a user "
                         "turn, and --chat-template a template that accepts them")
    return prompts


@dataclass
class EvalPrompts:
    """The prompts of one eval run: ``ids`` (token ids, chat template and generation prompt
    applied), the tokenizer that rendered them and the records passed over, by reason."""

    ids: list[list[int]]
    tokenizer: object
    skipped: dict[str, int]


def load_eval_prompts(*, target_path: str, input_data: str | None = None, num_prompts: int = 20,
                      chat_template: str | None = None, trust_remote_code: bool = False) -> EvalPrompts:
    """The first ``num_prompts`` prompts of ``input_data`` (chats or a prompts-only file; default:
    the embedded held-out chats), rendered with ``chat_template`` (a ``--chat-template`` value) or
    ``target_path``'s tokenizer's own. Both evals (ours and ``--engine vllm``) read them here."""
    from draftcache.data import load_conversations, set_chat_template
    from draftcache.defaults import default_eval_data_path
    from draftcache.targets.loading import load_tokenizer

    tokenizer = load_tokenizer(target_path, trust_remote_code=trust_remote_code, chat_template=chat_template)
    set_chat_template(tokenizer, chat_template)
    # prompts-only records are welcome here; read only as many records as the prompts need
    conversations = load_conversations(input_data or default_eval_data_path(), prompts=True, lazy=True)
    ids = prompt_ids_from_conversations(conversations, tokenizer, num_prompts, conversations.skipped)
    return EvalPrompts(ids=ids, tokenizer=tokenizer, skipped=conversations.skipped.as_dict())


@torch.no_grad()
def evaluate_draft(
    *,
    draft_dir: str,
    target_model: str | None = None,
    input_data: str | None = None,
    num_prompts: int = 20,
    draft_tokens: int = 4,
    max_new_tokens: int = 64,
    device: str | None = None,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    prompts: EvalPrompts | None = None,
    method: str = "auto",
) -> EvalReport:
    """Measure the draft in ``draft_dir`` against its target on ``num_prompts`` prompts from
    ``input_data`` (see :func:`load_eval_prompts`; ``prompts`` gives them ready-made).

    ``method``: ``eagle3`` (chain drafting, ``draft_tokens`` per round), ``peagle`` (parallel
    drafting: ``draft_tokens`` from one drafter forward per round), ``dflash`` (block drafting;
    ``K = block_size - 1`` from the draft's config, ``draft_tokens`` is not used), ``dspark`` (block
    drafting with the Markov step, ``K = block_size``) or ``auto`` (from the export's ``config.json``)."""
    from draftcache.defaults import default_target_path
    from draftcache.targets.loading import load_target_model, resolve_device

    if num_prompts < 1 or draft_tokens < 1 or max_new_tokens < 1:
        raise ValueError("--num-prompts, --draft-tokens and --max-new-tokens must all be >= 1")
    found = block_draft_method(draft_dir) or ("peagle" if is_peagle_export(draft_dir) else "eagle3")
    if method not in ("auto", "eagle3", "peagle", "dflash", "dspark"):
        raise ValueError(f"--method must be auto, eagle3, peagle, dflash or dspark, got {method!r}")
    if method != "auto" and method != found:
        raise ValueError(f"--method {method} but {draft_dir} holds a {found} draft; pass --method {found} or auto")
    dev = resolve_device(device)
    target_path = target_model or default_target_path()
    if prompts is None:
        prompts = load_eval_prompts(target_path=target_path, input_data=input_data, num_prompts=num_prompts,
                                    chat_template=chat_template, trust_remote_code=trust_remote_code)
    model = load_target_model(target_path, device=dev, trust_remote_code=trust_remote_code)
    eos = prompts.tokenizer.eos_token_id
    if found in ("dflash", "dspark"):
        draft = load_exported_dflash_draft(draft_dir, model).to(dev).eval()
        target = HFDFlashTargetModel(model, draft.config.target_layer_ids)
        draft_tokens = draft.config.draft_tokens

        def speculate(ids, max_new, stats=None):
            return dflash_speculative_generate(target, draft, ids, max_new_tokens=max_new, stats=stats,
                                               eos_token_id=eos)
    else:
        draft = load_exported_draft(draft_dir, target_embeddings=model.get_input_embeddings().weight.detach().float().cpu())
        target = HFEagle3TargetModel(model, aux_layer_ids=draft.config.aux_layer_ids)

        def speculate(ids, max_new, stats=None):
            return speculative_generate(target, draft, ids, max_new_tokens=max_new, draft_tokens=draft_tokens,
                                        stats=stats, eos_token_id=eos)
    draft = draft.to(dev).eval()
    if dev.type != "cpu":
        draft = draft.to(torch.bfloat16)

    warm = torch.tensor(prompts.ids[0], device=dev)
    greedy_generate(model, warm, 4, eos)
    speculate(warm, 4)

    stats = SpecDecodeStats(draft_tokens=draft_tokens)
    t_greedy = t_spec = 0.0
    n_greedy = n_spec = 0
    mismatches = 0
    outputs = []
    for p in prompts.ids:
        ids = torch.tensor(p, device=dev)
        ref, dt = timed(greedy_generate, model, ids, max_new_tokens, eos)
        t_greedy, n_greedy = t_greedy + dt, n_greedy + len(ref)
        out, dt = timed(speculate, ids, max_new_tokens, stats)
        t_spec, n_spec = t_spec + dt, n_spec + len(out)
        mismatches += int(out != ref)
        outputs.append(out)
    return EvalReport(
        num_prompts=len(prompts.ids), draft_tokens=draft_tokens, tau=stats.tau, acceptance_rates=stats.acceptance_rates,
        tokens=n_spec, greedy_tokens_per_s=n_greedy / max(t_greedy, 1e-9), spec_tokens_per_s=n_spec / max(t_spec, 1e-9),
        mismatches=mismatches, skipped=dict(prompts.skipped), stats=stats, outputs=outputs,
    )
