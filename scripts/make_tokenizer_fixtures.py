#!/usr/bin/env python3
"""Write the tokenizer test fixtures of kiln-models (tests/fixtures/tokenizer/*.json).

Each fixture is a small tokenizer trained here, written as the GGUF metadata that
llama.cpp's converter would store for it (tokenizer.ggml.model, .pre, .tokens,
.token_type, .merges or .scores, special token ids, add_bos_token), plus test cases:
texts and the token ids that an independent implementation produces for them.

- gpt2 / llama3 / qwen2: byte-level BPE trained with Hugging Face `tokenizers`; the
  pre-tokenizer is GPT-2's ByteLevel regex, or a Split on the regex of Llama 3's or
  Qwen2's tokenizer.json followed by ByteLevel without its regex, as in those models.
  Ids come from `Tokenizer.encode(text, add_special_tokens=False)`: added special
  tokens are matched in the text (llama.cpp's parse_special=true); with
  `encode_special_tokens = True` they are not (parse_special=false), while added
  non-special tokens still are, as llama.cpp does for user-defined tokens.
- spm: a SentencePiece BPE model with byte fallback, trained with `sentencepiece` in
  Llama's settings (identity normalization, dummy prefix, extra whitespace kept); ids
  come from `SentencePieceProcessor.encode`, which is what llama.cpp computes with
  add_space_prefix on texts without special tokens.
- shakespeare-tiny (when models/shakespeare-tiny/tokenizer.json exists): the
  project's own model's tokenizer; the fixture records only the cases and the SHA-256
  of that file, and the Rust test reads the vocabulary from the model directory.

Token types follow llama.cpp's converter: 1 normal, 2 unknown, 3 control (special
added tokens), 4 user-defined (added tokens that are not special), 6 byte.

Usage: python3 scripts/make_tokenizer_fixtures.py   (needs tokenizers, sentencepiece)
"""

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "crates" / "kiln-models" / "tests" / "fixtures" / "tokenizer"
SHAKESPEARE_TOKENIZER = ROOT / "models" / "shakespeare-tiny" / "tokenizer.json"

# The split regexes exactly as the models' tokenizer.json files write them (kiln uses
# llama.cpp's rewritten forms, so the two sides do not share a pattern string).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text: prose, code, numbers, whitespace and several scripts, so that the
# merges cover spaces, digits, punctuation runs and multi-byte characters.
CORPUS = """\
The river ran quietly past the old mill, and the miller's daughter counted the sacks.
She counted 12 sacks on Monday, 125 on Tuesday and 1250 by the end of the week.
"We'll need more flour," she said. "They're asking for 3,400 loaves before the fair."
Her brother didn't answer; he'd gone to town at 7:45 with the cart and the two horses.
It's a long road, and the road is longer when it rains: 18 miles there, 18 back.
In the evening they sat by the fire, reading the letters that had come from the city.
The letters spoke of trains and telegraphs, of streets lit all night, of 100000 people.
I've never seen such a place, the daughter thought. I'm not sure I would want to.
Café au lait, crème brûlée, naïve façades: the French words sounded like music.
Über den Straßen lag Nebel; die Bäume waren grün und die Häuser weiß.
El niño comió la piña en la mañana; ¿quién sabe por qué? ¡Qué día!
Καλημέρα κόσμε· η θάλασσα είναι ήσυχη σήμερα.
Привет, мир! Это простой текст для проверки токенизатора.
日本語の文章です。東京は大きな都市です。
中文测试文本，今天天气很好。
한국어 문장도 조금 있습니다.
Emoji appear too: 🙂 🎉 👍 and the weather today is ☀️.
def count_sacks(days):
    total = 0
    for day in days:
        total += day.sacks  # add up
    return total

fn main() {
    let values = vec![1, 22, 333, 4444];
    println!("{:?}", values.iter().sum::<i32>());
}
if (x >= 10 && y <= 20) { return x * y / 2; } else { return -1; }
    Indented lines,\ttabs\tand  double  spaces   appear   here.
Line one
Line two\r
Line three


After two blank lines, the story continues with 2024-01-31 and 3.14159.
THE END. WE'LL SEE. THEY'RE GONE. IT'S OVER. I'D SAY SO.
"""

# Texts every fixture is checked on (special-token texts only where they exist).
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "the miller's daughter counted 125 sacks",
    "  leading spaces and trailing   ",
    "multiple     spaces between   words",
    "tabs\tand\tmore\t\ttabs",
    "newlines\nand\r\ncarriage returns\n\n\nend",
    "   \n   indented after newline",
    "digits 1234567 and 3.14159, 42nd, 007, 1000000",
    "contractions: it's we'll they're I've I'm he'd don't",
    "UPPER CONTRACTIONS: IT'S WE'LL THEY'RE I'VE I'M HE'D",
    "accents: café naïve façade über straße Ångström",
    "combining: e\u0301 a\u0308 n\u0303",
    "Greek: Καλημέρα κόσμε; Russian: Привет, мир!",
    "CJK: 日本語のテキスト 中文测试 한국어",
    "emoji: 🙂👍🏽 🇫🇷 family 👨\u200d👩\u200d👧 ☀️",
    "numbers beyond ASCII: Ⅻ ½ ² ٣٤٥ ３４",
    "spaces beyond ASCII: a\u00a0b\u3000c\u2003d",
    'code: fn main() { println!("{}", x + 1); } // done',
    "punctuation!!! ... ??? ;-) (parens) [brackets] {braces}",
    "",
    " ",
    "\n",
    "a",
]

SPECIAL_TEXTS = {
    "gpt2": [
        "before<|endoftext|>after",
        "<|endoftext|><|endoftext|>",
        "a <tool> b<tool>c",
    ],
    "llama3": [
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>",
        "text <|end_of_text|> more",
        "a <tool> b<tool>c",
    ],
    "qwen2": [
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
        "x<|endoftext|>y",
        "a <tool> b<tool>c",
    ],
}


# Words that become one extra vocabulary token after training, unreachable by the
# merges (as in Llama 3's vocabulary): with ignore_merges the pre-token is taken whole,
# without it the merges decide. The first one training did not already make is used.
UNREACHABLE_WORDS = ["Ġmiller", "Ġdaughter", "Ġcounted"]


def byte_level_tokenizer(pre_tokenizer, specials: list[str], user_defined: list[str], vocab_size: int,
                         ignore_merges: bool) -> Tokenizer:
    """Trains a byte-level BPE tokenizer on CORPUS with the given pre-tokenizer, then
    adds one unreachable word token and the user-defined tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True) * 3, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    word = next(w for w in UNREACHABLE_WORDS if w not in vocab)
    vocab[word] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    tokenizer.model = models.BPE(vocab, merges, ignore_merges=ignore_merges)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tokenizer


def byte_level_metadata(tokenizer: Tokenizer, pre: str) -> dict:
    """The GGUF tokenizer metadata llama.cpp's converter writes for `tokenizer`."""
    data = json.loads(tokenizer.to_str())
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    assert all(t is not None for t in tokens), "token ids are not contiguous"
    types = [1] * len(tokens)
    for added in data["added_tokens"]:
        types[added["id"]] = 3 if added["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


def byte_level_cases(tokenizer: Tokenizer, texts: list[str]) -> list[dict]:
    cases = []
    for text in texts:
        for parse_special in (True, False):
            tokenizer.encode_special_tokens = not parse_special
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            cases.append({"text": text, "parse_special": parse_special, "ids": ids})
    tokenizer.encode_special_tokens = False
    return cases


def gpt2_fixture() -> dict:
    specials = ["<|endoftext|>"]
    tok = byte_level_tokenizer(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                               specials, ["<tool>"], 700, ignore_merges=False)
    meta = byte_level_metadata(tok, "gpt-2")
    eot = tok.token_to_id("<|endoftext|>")
    meta.update({
        "tokenizer.ggml.bos_token_id": eot,
        "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.add_bos_token": False,
    })
    return {"metadata": meta, "cases": byte_level_cases(tok, TEXTS + SPECIAL_TEXTS["gpt2"])}


def split_then_bytes(pattern: str):
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def llama3_fixture() -> dict:
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                "<|eot_id|>"]
    tok = byte_level_tokenizer(split_then_bytes(LLAMA3_SPLIT), specials, ["<tool>"], 800,
                               ignore_merges=True)
    meta = byte_level_metadata(tok, "llama-bpe")
    meta.update({
        "tokenizer.ggml.bos_token_id": tok.token_to_id("<|begin_of_text|>"),
        "tokenizer.ggml.eos_token_id": tok.token_to_id("<|end_of_text|>"),
        "tokenizer.ggml.add_bos_token": True,
    })
    return {"metadata": meta, "cases": byte_level_cases(tok, TEXTS + SPECIAL_TEXTS["llama3"])}


def qwen2_fixture() -> dict:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = byte_level_tokenizer(split_then_bytes(QWEN2_SPLIT), specials, ["<tool>"], 800,
                               ignore_merges=False)
    meta = byte_level_metadata(tok, "qwen2")
    eot = tok.token_to_id("<|endoftext|>")
    meta.update({
        "tokenizer.ggml.bos_token_id": eot,
        "tokenizer.ggml.eos_token_id": eot,
        "tokenizer.ggml.padding_token_id": eot,
        "tokenizer.ggml.add_bos_token": False,
    })
    return {"metadata": meta, "cases": byte_level_cases(tok, TEXTS + SPECIAL_TEXTS["qwen2"])}


def spm_fixture() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(CORPUS * 3, encoding="utf-8")
        prefix = str(Path(tmp) / "spm")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=600,
            byte_fallback=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            remove_extra_whitespaces=False,
            character_coverage=0.995,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    n = sp.get_piece_size()
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(2)
        elif sp.is_control(i):
            types.append(3)
        elif sp.is_byte(i):
            types.append(6)
        elif sp.is_unused(i):
            types.append(5)
        else:
            types.append(1)
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    # sentencepiece never matches control tokens in text, so no special-token texts.
    cases = [{"text": t, "parse_special": False, "ids": sp.encode(t, out_type=int)} for t in TEXTS]
    return {"metadata": meta, "cases": cases}


def shakespeare_fixture() -> dict | None:
    if not SHAKESPEARE_TOKENIZER.exists():
        return None
    raw = SHAKESPEARE_TOKENIZER.read_bytes()
    tok = Tokenizer.from_str(raw.decode("utf-8"))
    texts = TEXTS + [
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
        "First Citizen:\nBefore we proceed any further, hear me speak.",
        "<|begin_of_text|>KING HENRY:<|end_of_text|>",
    ]
    return {
        "tokenizer_json": "models/shakespeare-tiny/tokenizer.json",
        "tokenizer_json_sha256": hashlib.sha256(raw).hexdigest(),
        "cases": byte_level_cases(tok, texts),
    }


def write(name: str, fixture: dict) -> None:
    path = OUT_DIR / f"{name}.json"
    path.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size} bytes, {len(fixture['cases'])} cases)")


def main() -> int:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    write("gpt2", gpt2_fixture())
    write("llama3", llama3_fixture())
    write("qwen2", qwen2_fixture())
    write("spm", spm_fixture())
    shakespeare = shakespeare_fixture()
    if shakespeare is not None:
        write("shakespeare_tiny", shakespeare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
