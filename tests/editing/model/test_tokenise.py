"""The spec §1.1 tokenisation: prompt with special tokens, " " + answer without, pre-shifted labels."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.errors import DataFormatError
from editing.model.loading import LoadedModel
from editing.model.tokenise import IGNORE_INDEX, pad_id, tokenise, tokenise_with_old


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def test_one_row_follows_the_spec(bpe_tokenizer: Any) -> None:
    prompt, answer = "The capital of France is", "Paris of the north"
    p = _ids(bpe_tokenizer, prompt, True)
    a = _ids(bpe_tokenizer, " " + answer, False)
    assert p[0] == bpe_tokenizer.bos_token_id and len(a) > 1
    batch = tokenise(bpe_tokenizer, [prompt], [answer])
    assert batch.input_ids[0].tolist() == p + a[:-1]
    assert batch.attention_mask[0].tolist() == [1] * (len(p) + len(a) - 1)
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * (len(p) - 1) + a
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long


def test_labels_are_pre_shifted_teacher_forcing(bpe_tokenizer: Any) -> None:
    batch = tokenise(
        bpe_tokenizer, ["Who sang", "The mother tongue of Anna Berg is"], ["Walter Sobchak", "Swedish"]
    )
    for row in range(len(batch)):
        positions = batch.answer_mask[row].nonzero().flatten().tolist()
        # every label but the last is the next token fed in: the model sees the answer's own prefix
        for t in positions[:-1]:
            assert batch.labels[row, t] == batch.input_ids[row, t + 1]
        assert positions == list(range(positions[0], positions[-1] + 1))
        assert batch.attention_mask[row, positions[-1]] == 1


def test_rows_are_right_padded(bpe_tokenizer: Any) -> None:
    batch = tokenise(bpe_tokenizer, ["Hi", "The official language of Peru is"], ["Rome", "Spanish"])
    short = int(batch.attention_mask[0].sum())
    assert short < batch.input_ids.shape[1]
    assert batch.attention_mask[0, :short].eq(1).all() and batch.attention_mask[0, short:].eq(0).all()
    assert batch.input_ids[0, short:].eq(pad_id(bpe_tokenizer)).all()
    assert batch.labels[0, short:].eq(IGNORE_INDEX).all()
    assert batch.attention_mask[1].eq(1).all()


def test_answer_whitespace_is_normalised(bpe_tokenizer: Any) -> None:
    plain = tokenise(bpe_tokenizer, ["Born in"], ["Berlin"])
    spaced = tokenise(bpe_tokenizer, ["Born in"], ["  Berlin "])
    assert torch.equal(plain.input_ids, spaced.input_ids) and torch.equal(plain.labels, spaced.labels)


def test_bad_inputs(bpe_tokenizer: Any) -> None:
    with pytest.raises(DataFormatError, match=r"answer ' ' .* is empty"):
        tokenise(bpe_tokenizer, ["Born in"], [" "])
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        tokenise(bpe_tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="no prompts"):
        tokenise(bpe_tokenizer, [], [])


def test_old_labels_align_with_the_new_answer(bpe_tokenizer: Any) -> None:
    prompts = ["The mother tongue of Anna Berg is", "Paris is in"]
    new = ["Swedish", "Italy and also some more words here"]
    old = ["French language of the north and south", "France"]
    batch, old_labels = tokenise_with_old(bpe_tokenizer, prompts, new, old)
    reference = tokenise(bpe_tokenizer, prompts, new)
    assert torch.equal(batch.input_ids, reference.input_ids) and torch.equal(batch.labels, reference.labels)
    assert old_labels.shape == batch.labels.shape
    width = batch.labels.shape[1]
    for row in range(2):
        start = int(batch.answer_mask[row].nonzero()[0])
        old_ids = _ids(bpe_tokenizer, " " + old[row], False)
        kept = old_ids[: width - start]
        assert old_labels[row, :start].eq(IGNORE_INDEX).all()
        assert old_labels[row, start : start + len(kept)].tolist() == kept
        assert old_labels[row, start + len(kept) :].eq(IGNORE_INDEX).all()
    # row 0: the old answer is longer than the batch leaves room for, so it is cut at the width
    assert len(_ids(bpe_tokenizer, " " + old[0], False)) > width - int(batch.answer_mask[0].nonzero()[0])


def test_to_moves_every_tensor(bpe_tokenizer: Any) -> None:
    batch = tokenise(bpe_tokenizer, ["Born in"], ["Berlin"]).to(torch.device("meta"))
    assert {t.device.type for t in (batch.input_ids, batch.attention_mask, batch.labels)} == {"meta"}


@pytest.mark.real_model
def test_smollm2_tokenisation(default_model: LoadedModel) -> None:
    tok = default_model.tokenizer
    # SmolLM2's tokenizer adds no BOS; " Paris" is one token with its leading space
    assert _ids(tok, "The capital of France is", True) == _ids(tok, "The capital of France is", False)
    (paris,) = _ids(tok, " Paris", False)
    assert tok.convert_ids_to_tokens([paris]) == ["ĠParis"]
    batch = tokenise(tok, ["The capital of France is"], ["Paris"])
    prompt = _ids(tok, "The capital of France is", True)
    assert batch.input_ids[0].tolist() == prompt
    assert batch.labels[0].tolist() == [IGNORE_INDEX] * (len(prompt) - 1) + [paris]
    assert pad_id(tok) == tok.pad_token_id
