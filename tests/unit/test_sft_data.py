"""Supervised fine-tuning data: chat and instruction rows → tokens whose labels are the answers
only, packing modes, the held-out validation part, and the errors a user gets."""
import json

import pytest

from raytune_llama.config import DataConfig, load_config
from raytune_llama.engine.data.sft import TemplateError, chat_pieces, render_prompt
from raytune_llama.engine.data.store import TokenStore, build_all
from raytune_llama.engine.packing import IGNORE_INDEX, pack_token_lists
from raytune_llama.engine.tokenizer_build import SHIPPED_TOKENIZER, load_tokenizer
from raytune_llama.trainer.data_pipeline import open_token_store

TOK = str(SHIPPED_TOKENIZER)
CHAT = load_config("examples/configs/tiny_chat.yaml").data
INSTRUCTION = load_config("examples/configs/tiny_instruction.yaml").data
EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(SHIPPED_TOKENIZER)


def _store(data: DataConfig, root, **changes) -> TokenStore:
    import dataclasses

    data = dataclasses.replace(data, **changes)
    return build_all(open_token_store(data, TOK, root).path, TOK)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _targets(tok, rows, i):
    ids, labels = rows["input_ids"][i], rows["labels"][i]
    return tok.decode(ids[labels != IGNORE_INDEX])


def test_chat_labels_are_the_assistant_turns_only(tmp_path, tok):
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
             {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3 plus 3?"},
             {"role": "assistant", "content": "It is 6."}]
    path = _write(tmp_path / "c.jsonl", [{"messages": convo}])
    store = _store(CHAT, tmp_path / "s", path=path, eval_fraction=0.0, id_column=None)
    rows = store.read([(0, 0)])
    text = tok.decode(rows["input_ids"][0][: rows["num_tokens"][0]])
    assert text.startswith("<s>system\nBe brief.</s>\n<s>user\nWhat is 2 plus 2?</s>\n<s>assistant\nIt is 4.")
    # the answers and their end-of-turn, plus the document's EOS (it ends with an answer)
    assert _targets(tok, rows, 0) == "It is 4.</s>\nIt is 6.</s>\n</s>"
    trained = _store(CHAT, tmp_path / "p", path=path, eval_fraction=0.0, id_column=None, train_on_prompt=True)
    all_rows = trained.read([(0, 0)])
    n = int(all_rows["num_tokens"][0])
    assert (all_rows["labels"][0][1:n] != IGNORE_INDEX).all()  # every token but the first is a target


def test_instruction_prompt_drops_empty_paragraphs_and_masks_the_prompt(tmp_path, tok):
    template = INSTRUCTION.prompt_template
    assert render_prompt(template, {"instruction": "Say hi.", "input": ""}) == \
        "### Instruction:\nSay hi.\n\n### Response:\n"
    assert "### Input:\nBob" in render_prompt(template, {"instruction": "Greet.", "input": "Bob"})
    path = _write(tmp_path / "i.jsonl", [{"instruction": "Say hi.", "input": "", "output": "Hi there."},
                                         {"instruction": "Greet.", "input": "Bob", "output": "Hello, Bob."}])
    store = _store(INSTRUCTION, tmp_path / "s", path=path, eval_fraction=0.0)
    rows = store.read([(0, 0)])
    assert _targets(tok, rows, 0) == "Hi there.</s>Hello, Bob.</s>"  # both documents share the row


def test_rows_without_an_answer_are_skipped_and_counted(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hello?"}]},          # no assistant turn
            {"messages": "not a list"}, {"other": 1},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]
    store = _store(CHAT, tmp_path / "s", path=_write(tmp_path / "c.jsonl", rows), eval_fraction=0.0, id_column=None)
    counts = store.counts()
    assert counts["documents"] == 1 and counts["docs_skipped"] == 3


def test_chat_format_without_a_template_names_the_option(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match="data.chat_template: the tokenizer at .* has no chat template"):
        open_token_store(DataConfig(path=path, format="chat"), TOK, tmp_path / "s")


def test_a_template_that_does_not_render_turns_in_order_is_refused(tok):
    reversed_turns = "{% for m in messages | reverse %}{{ m['content'] }}|{% endfor %}"
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    with pytest.raises(TemplateError, match="data.chat_template"):
        chat_pieces(tok, row, "messages", reversed_turns)


def test_config_errors_name_the_field(tmp_path):
    from raytune_llama.config import ConfigError

    path = _write(tmp_path / "i.jsonl", [{"question": "q", "answer": "a"}])
    cfg = load_config(None, [f"data.path={path}", "data.format=instruction", "checkpoint.keep_best=eval_loss",
                             "data.packing=tight"])
    with pytest.raises(ConfigError) as err:
        cfg.validate(check_files=True)
    text = str(err.value)
    assert "column 'instruction' is not in" in text and "data.response_column: column 'output'" in text
    assert "data.packing: 'tight' is not one of ['documents', 'naive', 'none']" in text
    assert "checkpoint.keep_best: 'eval_loss' needs validation data" in text
    with pytest.raises(ConfigError, match=r"data.eval_fraction: 1.5 must be in \[0, 1\)"):
        load_config(None, ["data.eval_fraction=1.5"]).validate(check_files=False)


def test_document_packing_keeps_documents_whole_with_their_own_positions():
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], list(range(40, 52)), [60]]  # 4,3,6,13,2 with EOS
    out = pack_token_lists(docs, seq_len=8, eos_id=EOS, pad_id=PAD, mode="documents")
    rows = {int(r[0]): i for i, r in enumerate(out["input_ids"])}
    ids, pos, labels = out["input_ids"], out["position_ids"], out["labels"]
    first = rows[10]
    assert ids[first].tolist() == [10, 11, 12, EOS, 20, 21, EOS, PAD]   # the third does not fit: a new row
    assert pos[first].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]              # padding continues the last document
    assert labels[first].tolist() == [-100, 11, 12, EOS, -100, 21, EOS, -100]
    # first fit: the last short document fills the gap the 6-token one left
    assert ids[rows[30]].tolist() == [30, 31, 32, 33, 34, EOS, 60, EOS] and pos[rows[30]].tolist()[6:] == [0, 1]
    # a document longer than a row fills whole rows and continues, its positions restarting per row
    assert ids[rows[40]].tolist() == list(range(40, 48)) and pos[rows[40]].tolist() == list(range(8))
    assert ids[rows[48]].tolist()[:5] == [48, 49, 50, 51, EOS] and pos[rows[48]].tolist()[:5] == [0, 1, 2, 3, 4]
    assert sorted(out["num_tokens"].tolist()) == [5, 7, 8, 8] and len(ids) == 4
    naive = pack_token_lists(docs, seq_len=8, eos_id=EOS, pad_id=PAD, mode="naive")
    assert "position_ids" not in naive and naive["input_ids"].shape[0] == 4  # 28 tokens in 4 rows
    none = pack_token_lists(docs, seq_len=8, eos_id=EOS, pad_id=PAD, mode="none")
    assert none["input_ids"].shape[0] == 6 and none["num_tokens"].tolist() == [4, 3, 6, 8, 5, 2]


def test_eval_fraction_holds_out_whole_documents_deterministically(tmp_path):
    path = _write(tmp_path / "c.jsonl", [{"id": f"d{i}", "text": f"document number {i} " * (1 + i % 5)}
                                         for i in range(400)])
    data = DataConfig(path=path, seq_len=32, eval_fraction=0.1, id_column="id")
    a = _store(data, tmp_path / "a")
    b = _store(data, tmp_path / "b")
    ev = TokenStore(a.path, part="eval")
    train_ids = {i for c in range(a.num_chunks) for cell in a.read([(c, r) for r in range(a.chunk_rows(c))],
                                                                   with_ids=True)["doc_ids"] for i in cell.split(",") if i}
    eval_ids = {i for c in range(ev.num_chunks) for cell in ev.read([(c, r) for r in range(ev.chunk_rows(c))],
                                                                    with_ids=True)["doc_ids"] for i in cell.split(",") if i}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 400
    assert 20 <= len(eval_ids) <= 60  # about 10%
    assert a.counts()["eval"] == b.counts()["eval"]  # the same split on every build
    with pytest.raises(ValueError, match="no evaluation part"):
        TokenStore(_store(DataConfig(path=path, seq_len=32), tmp_path / "c").path, part="eval")
