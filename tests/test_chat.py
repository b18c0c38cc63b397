"""Chat / Alpaca data: Alpaca prompts, assistant-only loss masks, malformed-record reports, the decoder-only
feature converter contract."""

import json
import logging

import numpy as np
import pytest
import seqio

from itjax.data import chat as chat_lib
from itjax.tasks import chat, quickstart

VOCAB = quickstart.get_vocabulary()  # words below are whole pieces of it, so texts decode back exactly

SHAREGPT = {"conversations": [
    {"from": "system", "value": "Return the first digit"},
    {"from": "human", "value": "Copy the words"},
    {"from": "gpt", "value": "the words"},
    {"from": "human", "value": "Reverse the list of words"},
    {"from": "gpt", "value": "words of list the Reverse"},
]}
MESSAGES = {"messages": [
    {"role": "user", "content": "Write the last word"},
    {"role": "assistant", "content": "word"},
]}


def _runs(mask):
    """[start, end) of every maximal run of 1s."""
    edges = np.diff(np.concatenate([[0], mask, [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def _examples(name, split="train"):
    return list(seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False).as_numpy_iterator())


def test_alpaca_prompts_are_stanford_alpacas():
    assert chat_lib.alpaca_prompt("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:")
    assert chat_lib.alpaca_prompt("Add the numbers.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n### Input:\n"
        "2 and 3\n\n### Response:")
    dolly = chat_lib.parse_record({"instruction": "Add the numbers.", "context": "2 and 3", "response": "5",
                                   "category": "closed_qa"}, "dolly")
    assert dolly == {"inputs": chat_lib.alpaca_prompt("Add the numbers.", "2 and 3"), "targets": "5"}


def test_alpaca_task_from_a_json_array_file(tmp_path):
    records = [{"instruction": "Copy the words", "input": "cat dog", "output": "cat dog"},
               {"instruction": "Write the first word", "input": "", "output": "tree"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, indent=2))
    chat.register_chat_task("test_alpaca", str(path), format="alpaca", vocabulary=VOCAB)
    examples = _examples("test_alpaca")
    assert [e["inputs_pretokenized"].decode() for e in examples] == [
        chat_lib.alpaca_prompt("Copy the words", "cat dog"), chat_lib.alpaca_prompt("Write the first word")]
    assert [e["targets_pretokenized"].decode() for e in examples] == ["cat dog", "tree"]
    assert examples[0]["inputs"][-1] != VOCAB.eos_id and examples[0]["targets"][-1] == VOCAB.eos_id


@pytest.mark.parametrize("record,fmt", [(SHAREGPT, "sharegpt"), (MESSAGES, "messages")])
def test_loss_mask_covers_exactly_the_assistant_turns(record, fmt, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    chat.register_chat_task(f"test_{fmt}", str(path), format=fmt, vocabulary=VOCAB)
    (ex,) = _examples(f"test_{fmt}")
    ids, mask = ex["targets"], ex["targets_loss_mask"]
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == mask.shape and "inputs" not in ex
    assert ids[-1] == VOCAB.eos_id and set(mask.tolist()) == {0, 1}
    messages = chat_lib.parse_record(record, fmt)
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    runs = _runs(mask)
    assert [VOCAB.decode(ids[a:b].tolist()) for a, b in runs] == assistant
    assert all(ids[b - 1] == VOCAB.eos_id for _, b in runs)  # each assistant turn ends with (masked-in) EOS
    assert mask.sum() == sum(len(VOCAB.encode(text)) + 1 for text in assistant)
    # Everything else is the template's text: the masked-out ids are the prefixes and the other turns.
    template = chat_lib.DEFAULT_TEMPLATE
    expected_out = []
    for m in messages:
        expected_out += VOCAB.encode(template.prefix(m["role"]))
        if m["role"] != "assistant":
            expected_out += VOCAB.encode(m["content"]) + VOCAB.encode(template.turn_suffix)
    assert ids[mask == 0].tolist() == expected_out
    assert ex["targets_pretokenized"].decode() == template.render(messages)


def test_configurable_template_and_a_conversation_ending_with_a_user_turn():
    template = chat_lib.ChatTemplate(user_prefix="User:", assistant_prefix="Answer:", turn_suffix="",
                                     assistant_suffix="Now", assistant_eos=True)
    messages = [{"role": "user", "content": "Copy the words"}, {"role": "assistant", "content": "the words"},
                {"role": "user", "content": "the list"}]
    ids, mask = chat_lib.tokenize_conversation(messages, VOCAB, template)
    (run,) = _runs(mask)
    assert VOCAB.decode(ids[run[0]:run[1]].tolist()) == "the words Now"
    assert ids[-1] == VOCAB.eos_id and mask[-1] == 0  # closing EOS of a conversation not ending with the assistant
    no_eos = chat_lib.ChatTemplate(assistant_eos=False)
    ids, mask = chat_lib.tokenize_conversation(messages[:2], VOCAB, no_eos)
    assert VOCAB.decode(ids[mask == 1].tolist()) == "the words" and ids[-1] == VOCAB.eos_id and mask[-1] == 0


def test_malformed_records_are_counted_with_file_and_line(tmp_path, caplog):
    lines = [
        json.dumps(SHAREGPT),
        "{not json",
        json.dumps({"conversation": []}),                                          # missing key
        json.dumps({"conversations": [{"from": "bot", "value": "hi"}]}),            # unknown role
        "",
        json.dumps({"conversations": []}),                                         # empty conversation
        json.dumps({"conversations": [{"from": "human", "value": "hi"}]}),          # no assistant turn
        json.dumps({"conversations": [{"from": "gpt", "value": 3}]}),               # not a string
        json.dumps({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}),  # missing value
    ]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("\n".join(lines) + "\n")
    parsed, report = chat_lib.read_records(str(path), "sharegpt")
    assert len(parsed) == 1 and report.num_records == 8 and report.num_malformed == 7
    assert [line for line, _ in report.malformed] == [2, 3, 4, 6, 7, 8, 9]
    reasons = dict(report.malformed)
    assert reasons[2].startswith("invalid JSON") and reasons[3] == "missing key 'conversations'"
    assert "unknown role 'bot'" in reasons[4] and reasons[6] == "empty conversation"
    assert "no assistant turn" in reasons[7] and "'value' is int, not a string" in reasons[8]
    assert reasons[9] == "turn 1: missing key 'value'"

    with caplog.at_level(logging.WARNING):
        data = chat.register_chat_task("test_malformed", str(path), format="sharegpt", vocabulary=VOCAB)
        assert len(_examples("test_malformed")) == 1
    assert f"{path}:4: turn 1: unknown role 'bot'" in caplog.text and "7 of 8 records malformed" in caplog.text
    assert data.reports["train"].num_malformed == 7
    chat.register_chat_task("test_malformed", str(path), format="sharegpt", vocabulary=VOCAB, on_malformed="error")
    with pytest.raises(Exception, match=f"{path}:2: invalid JSON"):
        _examples("test_malformed")

    # In a JSON array the line is where the record starts.
    records = [{"instruction": "a", "output": "b"}, {"instruction": "c"}, {"output": "d", "instruction": 1}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records, indent=2))
    starts = [i + 1 for i, line in enumerate(path.read_text().splitlines()) if line == "  {"]
    _, report = chat_lib.read_records(str(path), "alpaca")
    assert report.malformed == [(starts[1], "missing key 'output'"), (starts[2], "'instruction' is int, not a string")]
    with pytest.raises(chat_lib.ChatDataError, match="validation"):
        chat.register_chat_task("test_bad", {"validation": [{"messages": []}]}, format="messages", vocabulary=VOCAB,
                                on_malformed="error", validate=True)


def test_non_utf8_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"instruction": "caf\u00e9", "output": "x"}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(chat_lib.ChatDataError, match=f"{path}: not UTF-8 text"):
        chat_lib.read_records(str(path), "alpaca")
    with pytest.raises(ValueError, match="format='chatml'"):
        chat.register_chat_task("x", str(path), format="chatml", vocabulary=VOCAB)


def test_decoder_feature_converter_puts_loss_on_assistant_tokens_only():
    """The contract with itjax.data.feature_converters.DecoderFeatureConverter: loss weights = the mask."""
    from itjax.data.feature_converters import DecoderFeatureConverter

    chat.register_chat_task("test_contract", {"train": [SHAREGPT, MESSAGES]}, format="sharegpt", vocabulary=VOCAB)
    ds = seqio.get_mixture_or_task("test_contract").get_dataset({"targets": 64}, split="train", shuffle=False)
    (ex,) = list(ds.as_numpy_iterator())  # the MESSAGES record is malformed as sharegpt (skipped)
    (row,) = list(DecoderFeatureConverter(pack=False)(ds, {"targets": 64}).as_numpy_iterator())
    n = len(ex["targets"]) - 1
    np.testing.assert_array_equal(row["decoder_target_tokens"][:n], ex["targets"][1:])
    np.testing.assert_array_equal(row["decoder_loss_weights"][:n], ex["targets_loss_mask"][1:])
    assert row["decoder_loss_weights"][n:].sum() == 0
