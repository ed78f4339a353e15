"""ChatTokenizer masks on real (tiny, offline) fast tokenizers with three template styles."""

from __future__ import annotations

import pytest
import torch

from data_chat_tokenizers import (
    CHATML_GENERATION_TEMPLATE,
    CHATML_PLAIN_TEMPLATE,
    CHATML_TEMPLATE,
    LLAMA3_TEMPLATE,
)
from draftcache.data import (
    BadRecordError,
    ChatTemplateError,
    ChatTokenizer,
    Conversation,
    NoConversationsError,
    SkipCounts,
    tokenize_all,
)

MULTI_TURN = Conversation(
    messages=[
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": "How are you today?"},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "It is four."},
    ],
    source="chat.jsonl:1",
)


def _masked_runs(chat: ChatTokenizer, sample) -> list[str]:
    """Decoded text of each contiguous run of supervised tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token, bit in zip(sample.input_ids.tolist(), sample.loss_mask.tolist()):
        if bit and not previous:
            runs.append([])
        if bit:
            runs[-1].append(token)
        previous = bit
    return [chat.tokenizer.decode(run) for run in runs]


def _check_tokens_are_the_rendering(chat: ChatTokenizer, sample, conversation: Conversation) -> None:
    text = chat.tokenizer.apply_chat_template(conversation.messages, tokenize=False)
    assert chat.tokenizer.decode(sample.input_ids.tolist()) == text
    assert sample.input_ids.dtype == torch.int64 and sample.loss_mask.dtype == torch.int64
    assert sample.input_ids.shape == sample.loss_mask.shape
    assert set(sample.loss_mask.tolist()) <= {0, 1}


def test_chatml_masks_assistant_text_and_im_end(make_tokenizer):
    chat = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 512)
    assert chat.mask_method == "prefix_spans"
    sample = chat.encode(MULTI_TURN)
    _check_tokens_are_the_rendering(chat, sample, MULTI_TURN)
    # the injected default system prompt and the user turns stay unsupervised
    assert _masked_runs(chat, sample) == ["How are you today?<|im_end|>", "It is four.<|im_end|>"]
    assert sample.source == "chat.jsonl:1"
    assert sample.num_supervised == int(sample.loss_mask.sum())


def test_chatml_explicit_system_and_leading_assistant_turn(make_tokenizer):
    chat = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 512)
    system = Conversation([{"role": "system", "content": "Be brief."}] + MULTI_TURN.messages, "a:2")
    sample = chat.encode(system)
    _check_tokens_are_the_rendering(chat, sample, system)
    assert _masked_runs(chat, sample) == ["How are you today?<|im_end|>", "It is four.<|im_end|>"]

    # a leading assistant turn: its prompt is the template's rendering of no message at all
    leading = Conversation([{"role": "assistant", "content": "Hello there!"}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "It is four."}], "a:1")
    plain = ChatTokenizer(make_tokenizer(CHATML_PLAIN_TEMPLATE), 512)
    sample = plain.encode(leading)
    _check_tokens_are_the_rendering(plain, sample, leading)
    assert _masked_runs(plain, sample) == ["Hello there!<|im_end|>", "It is four.<|im_end|>"]
    # a template that reads messages[0] cannot render that prompt: counted as a template error
    skipped = SkipCounts()
    assert tokenize_all([leading, MULTI_TURN], chat, skipped)[0].source == "chat.jsonl:1"
    assert skipped.as_dict() == {"template_error": 1}


def test_llama3_masks_trimmed_text_and_eot(make_tokenizer):
    chat = ChatTokenizer(make_tokenizer(LLAMA3_TEMPLATE), 512)
    assert chat.mask_method == "prefix_spans"
    conversation = Conversation(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"},
         {"role": "assistant", "content": "  How are you today?\n"}, {"role": "user", "content": "Tell me a joke"},
         {"role": "assistant", "content": "Cats and dogs."}],
        "l:1",
    )
    sample = chat.encode(conversation)
    _check_tokens_are_the_rendering(chat, sample, conversation)
    assert sample.input_ids[0].item() == chat.tokenizer.bos_token_id  # BOS written once, by the template
    assert int((sample.input_ids == chat.tokenizer.bos_token_id).sum()) == 1
    # the template trims contents, so the supervised text is the trimmed one
    assert _masked_runs(chat, sample) == ["How are you today?<|eot_id|>", "Cats and dogs.<|eot_id|>"]


@pytest.mark.parametrize("tag", ["{% generation %}", "{%- generation %}", "{%- generation -%}"])
def test_generation_tags_use_the_tokenizer_mask(make_tokenizer, tag):
    template = CHATML_GENERATION_TEMPLATE.replace("{%- generation %}", tag)
    chat = ChatTokenizer(make_tokenizer(template), 512)
    assert chat.mask_method == "generation_tags"
    sample = chat.encode(MULTI_TURN)
    _check_tokens_are_the_rendering(chat, sample, MULTI_TURN)
    assert _masked_runs(chat, sample) == ["How are you today?<|im_end|>", "It is four.<|im_end|>"]


def test_generation_tags_and_prefix_spans_agree(make_tokenizer):
    tagged = ChatTokenizer(make_tokenizer(CHATML_GENERATION_TEMPLATE), 512).encode(MULTI_TURN)
    plain = ChatTokenizer(make_tokenizer(CHATML_PLAIN_TEMPLATE), 512).encode(MULTI_TURN)
    assert torch.equal(tagged.input_ids, plain.input_ids)
    assert torch.equal(tagged.loss_mask, plain.loss_mask)


def test_token_straddling_a_boundary_counts_as_assistant(make_tokenizer):
    # the assistant header ends in " Hel" and the answer starts with "lo": BPE merges " Hello" across
    # the boundary; both methods supervise the merged token
    body = "{{- '<|im_start|>' + message['role'] + ':' + message['content'] + '<|im_end|>\\n' }}"
    plain = (
        "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>A: Hel' + message['content'] + '<|im_end|>\\n' }}"
        "{%- else %}" + body + "{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>A: Hel' }}{%- endif %}"
    )
    tagged = (
        "{%- for message in messages %}{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>A: Hel' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
        "{%- else %}" + body + "{%- endif %}{%- endfor %}"
    )
    conversation = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "lo there!"}], "s:1")
    chat = ChatTokenizer(make_tokenizer(plain), 512)
    sample = chat.encode(conversation)
    hello = chat.tokenizer.convert_tokens_to_ids("ĠHello")
    assert hello in sample.input_ids.tolist()  # the merge really crosses the boundary
    assert _masked_runs(chat, sample) == [" Hello there!<|im_end|>"]
    other = ChatTokenizer(make_tokenizer(tagged), 512).encode(conversation)
    assert torch.equal(other.loss_mask, sample.loss_mask)


def test_template_that_rewrites_history_is_refused(make_tokenizer):
    # like Qwen3: only the last assistant turn gets a think block, so earlier renderings are not prefixes
    template = (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['role'] == 'assistant' and loop.last %}{{- '<think></think>' }}{%- endif %}"
        "{{- message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    chat = ChatTokenizer(make_tokenizer(template), 512)
    with pytest.raises(ChatTemplateError, match=r"chat\.jsonl:1: the chat template is not prefix-stable at message 1 "
                                                r"\(assistant\).*\{% generation %\}.*\(pass it with --chat-template\)"):
        chat.encode(MULTI_TURN)
    # in a run it is that record's skip, named, and the template's run-level error only when every record fails
    one_turn = Conversation(MULTI_TURN.messages[:2], "chat.jsonl:2")
    skipped = SkipCounts()
    assert [s.source for s in tokenize_all([MULTI_TURN, one_turn], chat, skipped)] == ["chat.jsonl:2"]
    assert skipped.first_source == {"template_error": "chat.jsonl:1"}
    with pytest.raises(BadRecordError, match=r"^chat\.jsonl:1: bad record \(template_error\): the chat template is not "
                                             "prefix-stable at message 1"):
        tokenize_all([MULTI_TURN, one_turn], chat, SkipCounts(), strict=True)


def test_truncation_keeps_the_prefix(make_tokenizer):
    full = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 512).encode(MULTI_TURN)
    cut = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 40).encode(MULTI_TURN)
    assert full.input_ids.numel() > 40
    assert cut.input_ids.numel() == 40
    assert torch.equal(cut.input_ids, full.input_ids[:40])
    assert torch.equal(cut.loss_mask, full.loss_mask[:40])


def test_tokenize_all_counts_and_strict(make_tokenizer):
    chat = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 512)
    first_answer = int(chat.encode(MULTI_TURN).loss_mask.nonzero()[0])
    short = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), first_answer)  # cuts before any assistant token
    long_prompt = Conversation([{"role": "user", "content": "Hello there! " * 20},
                                {"role": "assistant", "content": "Hi"}], "c.jsonl:2")
    skipped = SkipCounts()
    samples = tokenize_all([MULTI_TURN, long_prompt], ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 30), skipped)
    assert [s.source for s in samples] == ["chat.jsonl:1"]
    assert skipped.as_dict() == {"no_supervised_tokens": 1}
    assert skipped.first_source == {"no_supervised_tokens": "c.jsonl:2"}

    with pytest.raises(BadRecordError, match=r"c\.jsonl:2: bad record \(no_supervised_tokens\): no assistant token "
                                             r"within the first 30 tokens"):
        tokenize_all([MULTI_TURN, long_prompt], ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 30), SkipCounts(),
                     strict=True)
    with pytest.raises(NoConversationsError, match="no conversation survived tokenization"):
        tokenize_all([MULTI_TURN], short, SkipCounts())
    assert tokenize_all([], chat, SkipCounts()) == []


def test_template_exception_is_counted(make_tokenizer):
    template = (
        "{%- for message in messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('Conversation roles must alternate user/assistant') }}{%- endif %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    chat = ChatTokenizer(make_tokenizer(template), 512)
    bad = Conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                        {"role": "assistant", "content": "c"}], "t.jsonl:5")
    skipped = SkipCounts()
    assert [s.source for s in tokenize_all([bad, MULTI_TURN], chat, skipped)] == ["chat.jsonl:1"]
    assert skipped.first_source == {"template_error": "t.jsonl:5"}
    with pytest.raises(BadRecordError, match=r"t\.jsonl:5: bad record \(template_error\): the chat template raised: "
                                             r"Conversation roles must alternate"):
        tokenize_all([bad], chat, SkipCounts(), strict=True)


def test_chat_tokenizer_rejects_bad_arguments(make_tokenizer):
    with pytest.raises(ValueError, match=r"seq_length must be an integer >= 2 \(or None\); got 1"):
        ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 1)
    with pytest.raises(ChatTemplateError, match="has no usable chat template .*; pass a template that works with "
                                                r"--chat-template \(the path of a Jinja file, or the template text\)"):
        ChatTokenizer(make_tokenizer(None), 16)
    # an explicit template overrides a missing one
    assert ChatTokenizer(make_tokenizer(None), 16, chat_template=LLAMA3_TEMPLATE).chat_template == LLAMA3_TEMPLATE


def test_identity_fingerprints_the_template(make_tokenizer):
    a = ChatTokenizer(make_tokenizer(CHATML_TEMPLATE), 64).identity()
    b = ChatTokenizer(make_tokenizer(LLAMA3_TEMPLATE), 64).identity()
    assert a["mask_method"] == "prefix_spans" and a["seq_length"] == 64
    assert len(a["chat_template_sha256"]) == 64
    assert a["chat_template_sha256"] != b["chat_template_sha256"]
    assert ChatTokenizer(make_tokenizer(CHATML_GENERATION_TEMPLATE), 64).identity()["mask_method"] == "generation_tags"
