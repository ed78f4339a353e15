"""Turn-by-turn regeneration on the embedded target with the real HF engine (batched, left-padded)."""

from __future__ import annotations

import pytest
import torch

from draftcache.data import BadRecordError, ChatTokenizer, Conversation
from draftcache.defaults import default_target_path
from draftcache.regenerate.engines import Generation, HFEngine
from draftcache.regenerate.turns import TurnRegenerator, end_of_turn_ids
from draftcache.targets.loading import load_target_model, load_tokenizer

MAX_NEW = 24


@pytest.fixture(scope="module")
def target():
    path = default_target_path()
    tokenizer = load_tokenizer(path)
    model = load_target_model(path, device=torch.device("cpu"))
    template = ChatTokenizer(tokenizer, None).chat_template
    return tokenizer, model, template


def _regenerator(target, engine=None, **kw):
    tokenizer, model, template = target
    engine = engine or HFEngine(model, stop_ids=[3], pad_token_id=0, temperature=0.0, max_new_tokens=MAX_NEW)
    return TurnRegenerator(tokenizer, template, engine, max_new_tokens=MAX_NEW, max_model_len=kw.pop("max_model_len", 2048),
                           **kw)


def _greedy_alone(target, messages) -> str:
    """The reply to ``messages`` from an unbatched, unpadded ``generate`` (an independent path)."""
    tokenizer, model, template = target
    ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        add_generation_prompt=True)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=3,
                         pad_token_id=0)[0, len(ids):].tolist()
    if 3 in out:
        out = out[: out.index(3)]
    return tokenizer.decode(out, skip_special_tokens=False)


def test_end_of_turn_ids_come_from_eos_and_the_template(target):
    tokenizer, _, template = target
    assert end_of_turn_ids(tokenizer, template) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer briefly."}
CHATS = [
    Conversation([SYSTEM, {"role": "user", "content": "Make a bulleted list of: ladder, planet, dragon, tunnel."},
                  {"role": "assistant", "content": "WRONG ANSWER ONE"},
                  {"role": "user", "content": "How many items are there?"},
                  {"role": "assistant", "content": "WRONG ANSWER TWO"},
                  {"role": "user", "content": "Thanks!"}], "multi"),
    Conversation([{"role": "user", "content": "Compute 4 + 16."},
                  {"role": "assistant", "content": "WRONG"}], "single"),
]


def test_every_assistant_turn_is_the_targets_reply_to_the_regenerated_history(target):
    multi, single = _regenerator(target).run(list(enumerate(CHATS)))
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    original = CHATS[0].messages
    for kept, was in zip(multi.messages, original):
        if was["role"] != "assistant":
            assert kept == was  # system and user turns verbatim, the trailing user turn too
    first, second = multi.messages[2]["content"], multi.messages[4]["content"]
    assert "WRONG" not in first + second
    # turn 2 answers the history with the *regenerated* turn 1, as an unbatched generate would
    assert first == _greedy_alone(target, multi.messages[:2])
    assert second == _greedy_alone(target, multi.messages[:4])
    assert single.messages[1]["content"] == _greedy_alone(target, single.messages[:1])
    assert multi.generated_tokens > 0 and multi.cut is None and single.cut is None


def test_prompt_too_long_cuts_the_conversation_before_that_turn(target):
    regen = _regenerator(target, max_model_len=MAX_NEW + 40)  # room for the first prompt only
    (multi,) = regen.run([(0, CHATS[0])])
    assert multi.cut == "prompt_too_long" and "assistant turn 2" in multi.detail
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant"]  # no unanswered user turn
    (skipped,) = _regenerator(target, max_model_len=MAX_NEW + 5).run([(0, CHATS[0])])
    assert skipped.skipped and skipped.cut == "prompt_too_long"


class _Replies:
    """An engine that answers with given token ids: the model behaviours the embedded target does
    not show on demand (an immediate end of turn, a reply cut at max_new_tokens)."""

    name = "stub"

    def __init__(self, replies):
        self.replies = list(replies)

    def version(self):
        return "stub"

    def generate(self, prompts, seeds):
        return [self.replies.pop(0) for _ in prompts]


def test_an_empty_reply_cuts_and_a_length_capped_one_counts_as_truncated(target):
    tokenizer = target[0]
    words = tokenizer("four items", add_special_tokens=False)["input_ids"]
    engine = _Replies([Generation(words, stopped=False), Generation([], stopped=True)])
    (multi,) = _regenerator(target, engine=engine).run([(0, CHATS[0])])
    assert multi.cut == "empty_reply" and multi.truncated_turns == 1
    assert multi.messages[-1] == {"role": "assistant", "content": tokenizer.decode(words)}
    (skipped,) = _regenerator(target, engine=_Replies([Generation([], True)])).run([(0, CHATS[1])])
    assert skipped.skipped and skipped.cut == "empty_reply"


def test_a_template_that_refuses_a_turn_is_a_template_error(target):
    tokenizer, model, template = target
    refusing = "{% if messages|length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}" + template
    engine = HFEngine(model, stop_ids=[3], pad_token_id=0, temperature=0.0, max_new_tokens=MAX_NEW)
    regen = TurnRegenerator(tokenizer, refusing, engine, max_new_tokens=MAX_NEW, max_model_len=2048)
    (multi,) = regen.run([(0, CHATS[0])])
    assert multi.cut == "template_error" and "only one exchange" in multi.detail
    assert [m["role"] for m in multi.messages] == ["system", "user", "assistant"]
    strict = TurnRegenerator(tokenizer, refusing, engine, max_new_tokens=MAX_NEW, max_model_len=2048, strict=True)
    with pytest.raises(BadRecordError, match=r"multi: bad record \(template_error\)"):
        strict.run([(0, CHATS[0])])


def test_sampling_is_seeded(target):
    tokenizer, model, template = target
    replies = []
    for _ in range(2):
        engine = HFEngine(model, stop_ids=[3], pad_token_id=0, temperature=1.0, max_new_tokens=MAX_NEW)
        regen = TurnRegenerator(tokenizer, template, engine, max_new_tokens=MAX_NEW, max_model_len=2048, seed=7)
        replies.append([r.messages for r in regen.run(list(enumerate(CHATS)))])
    assert replies[0] == replies[1]
