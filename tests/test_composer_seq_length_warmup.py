"""Composer's own ``tests/algorithms/test_seq_length_warmup.py``, ported to our algorithm.

The assertions are Composer's (``check_batch_truncation``, ``check_batch_non_truncation``, the two tests
of ``TestSeqLengthWarmup``). What is mapped:

* imports: ``SeqLengthWarmup`` and ``set_batch_sequence_length`` from ``composer_growth``;
* arguments: ``truncate=True/False`` -> ``mode="truncate"/"reshape"``; the functional op's positional
  ``truncate`` likewise;
* the models and loaders: a tiny BERT (masked LM) and a tiny GPT-2 (causal LM) built from configs here,
  and batches of random token ids through transformers' ``DataCollatorForLanguageModeling`` (so the
  batches are ``BatchEncoding``\\ s), 2 rows per batch, 2 batches per epoch, as in Composer's helpers.
  The sequences are 16 tokens (``max_seq_length``) instead of Composer's 4: with 4, shorter than both
  lengths, nothing is ever cut, and our algorithm rejects a ``max_seq_length`` longer than the batch.
  Composer's third case (a non-HuggingFace classifier, marked xfail there) is left out: our algorithm
  is tested on non-HuggingFace models in ``test_seq_length_warmup.py``.
"""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from composer.models import HuggingFaceModel
from torch.utils.data import DataLoader
from transformers import (BatchEncoding, BertConfig, BertForMaskedLM, BertTokenizerFast, DataCollatorForLanguageModeling,
                          GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast)

from composer_growth import SeqLengthWarmup
from composer_growth.functional import set_batch_sequence_length

VOCAB = 64
SEQUENCE_LENGTH = 16

# -- models and loaders (built here: nothing downloaded) -------------------------------------------


def _bert_tokenizer(tmp_path_factory):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


def _gpt_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(WordLevel(vocab, unk_token="w1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w2", unk_token="w1")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return {"bert": _bert_tokenizer(tmp_path_factory), "gpt": _gpt_tokenizer()}


def configure_tiny_bert_hf_model(tokenizers):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return HuggingFaceModel(BertForMaskedLM(config), tokenizers["bert"], use_logits=True)


def configure_tiny_gpt2_hf_model(tokenizers):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return HuggingFaceModel(GPT2LMHeadModel(config), tokenizers["gpt"], use_logits=True)


def _lm_dataloader(tokenizer, mlm: bool, sequence_length=SEQUENCE_LENGTH, size=4):
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(5, VOCAB, (sequence_length,), generator=g).tolist()} for _ in range(size)]
    collate_fn = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=mlm, mlm_probability=0.15)
    return DataLoader(data, batch_size=2, collate_fn=collate_fn)


def dummy_bert_lm_dataloader(tokenizers):
    return _lm_dataloader(tokenizers["bert"], mlm=True)


def dummy_gpt_lm_dataloader(tokenizers):
    return _lm_dataloader(tokenizers["gpt"], mlm=False)


# -- Composer's checks, as they are ---------------------------------------------------------------


def check_batch_truncation(before, after, length, preserve_end_of_sequence=False):
    before_lengths = [int(m.sum()) for m in before['attention_mask']]

    # Just make sure the lengths are correct
    for k in before.keys():

        assert k in after, 'No keys should be removed during sequence truncation.'

        assert before[k].shape[0] == after[k].shape[0], (
            'The batch size should not be changed during sequence truncation.'
        )

        if before[k].ndim >= 2:

            assert after[k].shape[1] == min(before[k].shape[1], length), 'Incorrect sequence length after truncation.'

            if preserve_end_of_sequence:
                # The last valid token before truncation should still be the last valid token
                for seq_before, seq_after, before_length in zip(before[k], after[k], before_lengths):
                    assert seq_after[min(length, before_length) - 1] == seq_before[before_length - 1]

    for k in after.keys():
        assert k in before, 'No keys should be added during sequence truncation'


def check_batch_non_truncation(before, after, length):
    # Make sure all the batch tensors have the same shape
    input_ids_after_shape = after['input_ids'].shape

    # Just make sure the lengths are correct
    for k in before.keys():

        assert k in after, 'No keys should be removed during sequence reshaping.'

        assert after[k].shape == input_ids_after_shape, (
            'All tensors should have the same size after sequence reshaping.'
        )

        b_numel = before[k].shape[0] * before[k].shape[1]
        a_numel = after[k].shape[0] * after[k].shape[1]
        assert a_numel >= b_numel - length, 'Sequence reshaping should throw away at most curr_sequence_length tokens.'

        assert torch.all(
            after[k][0] == before[k][0, :input_ids_after_shape[1]],
        ), 'Sequence reshaping should not change the token order.'

    for k in after.keys():
        assert k in before, 'No keys should be added during sequence reshaping.'


def check_batch(before, after, length, truncate: bool, preserve_end_of_sequence: bool):
    if truncate:
        check_batch_truncation(before, after, length, preserve_end_of_sequence)
    else:
        check_batch_non_truncation(before, after, length)


def check_forward_backward(model, batch):
    model.zero_grad()
    output = model.forward(batch)
    output['loss'].backward()


def _state(model, dataloader) -> State:
    return State(
        model=model,
        rank_zero_seed=0,
        run_name='run_name',
        device=DeviceCPU(),
        dataloader=dataloader,
        dataloader_label='train',
        max_duration='1ep',
    )


def _mode(truncate: bool) -> str:
    return "truncate" if truncate else "reshape"


@pytest.mark.parametrize('model, dataloader', [
    (configure_tiny_bert_hf_model, dummy_bert_lm_dataloader),
    (configure_tiny_gpt2_hf_model, dummy_gpt_lm_dataloader),
])
@pytest.mark.parametrize('truncate,preserve_end_of_sequence', [(True, True), (True, False), (False, False)])
class TestSeqLengthWarmup:

    @pytest.mark.parametrize('curr_seq_length', [8, 64])
    def test_functional(self, tokenizers, model, dataloader, curr_seq_length: int, truncate: bool,
                        preserve_end_of_sequence: bool):
        model = model(tokenizers)
        dataloader = dataloader(tokenizers)
        state = _state(model, dataloader)
        batch_before = next(iter(dataloader))
        assert isinstance(batch_before, BatchEncoding)
        batch_after = set_batch_sequence_length(
            deepcopy(batch_before),
            curr_seq_length,
            _mode(truncate),
            preserve_end_of_sequence,
        )
        assert isinstance(batch_after, BatchEncoding)  # the Mapping type given comes back

        check_batch(batch_before, batch_after, curr_seq_length, truncate, preserve_end_of_sequence)
        check_forward_backward(state.model, batch_after)

    def test_algorithm(self, tokenizers, model, dataloader, truncate: bool, preserve_end_of_sequence: bool):
        model = model(tokenizers)
        dataloader = dataloader(tokenizers)
        state = _state(model, dataloader)
        empty_logger = Logger(state)

        # Synthetic dataset has a size of 2 batches per epoch (max duration = 1ep)
        seq_length_warmup = SeqLengthWarmup(
            duration=0.5,
            min_seq_length=8,
            max_seq_length=16,
            step_size=8,
            mode=_mode(truncate),
            preserve_end_of_sequence=preserve_end_of_sequence,
        )
        seq_length_warmup.apply(Event.INIT, state, empty_logger)

        batch_before = next(iter(dataloader))
        state.batch = deepcopy(batch_before)
        seq_length_warmup.apply(Event.AFTER_DATALOADER, state, empty_logger)

        # At this point, we should see the MINIMUM sequence length after truncation
        check_batch(batch_before, state.batch, seq_length_warmup.min_seq_length, truncate, preserve_end_of_sequence)
        check_forward_backward(state.model, state.batch)

        # Note: max duration is 1 epoch
        state.timestamp = state.timestamp.to_next_batch(samples=state.batch['input_ids'].shape[0])
        batch_before = next(iter(dataloader))
        state.batch = deepcopy(batch_before)
        seq_length_warmup.apply(Event.AFTER_DATALOADER, state, empty_logger)

        # At this point, we should see the MAXIMUM sequence length after truncation
        check_batch(batch_before, state.batch, seq_length_warmup.max_seq_length, truncate, preserve_end_of_sequence)
        check_forward_backward(state.model, state.batch)
