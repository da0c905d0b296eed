from transformers import CLIPTokenizer

from auditing.models.tokenizer import DEFAULT_WORDS, build_tokenizer, write_tokenizer_files


def test_every_world_word_is_one_token():
    tok = build_tokenizer()
    for word in DEFAULT_WORDS:
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_unknown_text_still_tokenizes_and_truncates():
    tok = build_tokenizer(model_max_length=16)
    ids = tok("a photorealistic portrait, artstation, 8k, highly detailed", truncation=True).input_ids
    assert len(ids) == 16 and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]


def test_vocab_and_merges_files_load_with_plain_transformers(tmp_path):
    write_tokenizer_files(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    reloaded = CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))
    ours = build_tokenizer()
    text = "a red triangle and a blue circle on a gray background"
    assert reloaded(text).input_ids == ours(text).input_ids
