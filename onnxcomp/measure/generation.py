"""Validate and time a pipeline of parts by what it generates (greedy decoding).

Validation (reference vs candidate, same samples):
- ``exact_sequence``: share of samples whose whole greedy output is identical;
- ``prefix_agreement``: mean share of the reference's tokens produced before the first
  divergence (``steps_before_divergence`` in tokens);
- ``token_error_rate``: edit distance between the two token sequences / reference length (the
  word error rate when a token is a word; for transcripts and captions, the task metric against
  the reference pipeline's output);
- teacher-forced, along the reference's tokens so every step compares like with like:
  ``logits_cosine`` (mean and min over steps) and ``forced_top1`` (argmax agreement);
- ``perplexity``: of the reference's own generations, under the reference and under the
  candidate (no real text is needed: it says how much less likely the candidate finds the
  reference's output);
- ``consistency`` of the candidate's files with each other: the first-step decoder run on the
  whole prefix gives the with-past path's last logits and token, and the merged file (if any)
  the same tokens as the separate files.

Timing (interleaved between pipelines, medians): time to first token (run-once parts + first
decoder step), per-token latency p50/p90 of the cached steps at a given context length, decode
tokens per second, and peak resident memory of a generation in a child process (KV cache
included). Steps are teacher-forced on a fixed token path so every pipeline does the same work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from onnxcomp import progress
from onnxcomp.edits import edit_distance
from onnxcomp.errors import UserError
from onnxcomp.parts import Parts, generate, iter_samples, open_parts, part_bytes

__all__ = ["bench_generation", "consistency", "validate_generation"]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else float(np.array_equal(a, b))


def _nll(logits: Sequence[np.ndarray], tokens: Sequence[int]) -> float:
    total = 0.0
    for row, token in zip(logits, tokens):
        row = row.astype(np.float64)
        top = row.max()
        total += float(np.log(np.exp(row - top).sum()) + top - row[token])
    return total / max(len(tokens), 1)


def _prefix(a: Sequence[int], b: Sequence[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def consistency(parts: Parts, sample: dict[str, np.ndarray], max_new_tokens: int | None = None
                ) -> dict[str, float | bool]:
    """Do the decoder files agree with each other on this sample? (see the module docstring)"""
    out: dict[str, float | bool] = {}
    manifest = parts.manifest
    has_pair = bool(manifest.by_role("decoder")) and bool(manifest.by_role("decoder-with-past"))
    if has_pair:
        stepped = generate(parts, sample, max_new_tokens, merged=False)
        if len(stepped.tokens) > 1:
            spec = manifest.generation
            prompt = sample.get("prompt_ids")
            start = (list(np.asarray(prompt).ravel()) if prompt is not None
                     else list(spec.start_ids))
            whole = dict(sample)
            whole["prompt_ids"] = np.array([start + stepped.tokens[:-1]], np.int64)
            one_shot = generate(parts, whole, 1, merged=False)
            out["with_past_vs_full_prefix_max_abs"] = float(
                np.max(np.abs(one_shot.logits[0] - stepped.logits[-1])))
            out["with_past_same_token"] = one_shot.tokens[0] == stepped.tokens[-1]
        if manifest.by_role("decoder-merged"):
            merged = generate(parts, sample, max_new_tokens, merged=True)
            out["merged_same_tokens"] = merged.tokens == stepped.tokens
    return out


def _words(text: str) -> list[str]:
    kept = "".join(c.lower() if c.isalnum() or c.isspace() or c == "'" else " " for c in text)
    return kept.split()


def word_error_rate(truth: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Word-level edit distance over all samples / words in ``truth`` (lowercased, punctuation
    dropped): the speech-recognition metric."""
    errors = sum(edit_distance(_words(t), _words(h)) for t, h in zip(truth, hypotheses))
    words = sum(len(_words(t)) for t in truth)
    return errors / max(words, 1)


def _decoder_of(parts: Parts):
    name = parts.manifest.raw.get("zoo")
    if not isinstance(name, str):
        return None
    from onnxcomp import zoo

    return zoo.token_decoder(name) if name in zoo.names() else None


def _encoder_of(parts: Parts):
    name = parts.manifest.raw.get("zoo")
    if not isinstance(name, str):
        return None
    from onnxcomp import zoo

    return zoo.text_encoder(name) if name in zoo.names() else None


def text_perplexity(reference: Parts, candidate: Parts, samples: list[dict], texts: list[str],
                    encode) -> dict[str, float] | None:
    """Perplexity of the real text (the labels' tokens, teacher-forced after the start tokens)
    under each pipeline: how likely each finds what was really said."""
    nll_ref, nll_cand = [], []
    for sample, text in zip(samples, texts):
        tokens = encode(text)
        if not tokens:
            return None
        nll_ref.append(_nll(generate(reference, sample, forced=tokens).logits, tokens))
        nll_cand.append(_nll(generate(candidate, sample, forced=tokens).logits, tokens))
    return {"text_perplexity_reference": float(np.exp(np.mean(nll_ref))),
            "text_perplexity_candidate": float(np.exp(np.mean(nll_cand)))}


def validate_generation(reference: Parts, candidate: Parts, samples, max_new_tokens: int | None
                        = None, decode=None) -> dict:
    """Greedy generation of both pipelines on ``samples`` (a Dataset or sample dicts). With a
    token decoder (``decode``, or the zoo's for the manifest's ``zoo`` name): transcripts and
    word error rates, against the reference's transcripts and, where the samples have labels
    (the spoken text), against the truth."""
    rows = []
    checks = []
    labels = getattr(samples, "labels", None)
    decode = decode or _decoder_of(reference)
    samples = list(iter_samples(samples))
    if not samples:
        raise UserError("no samples to generate from")
    with progress.current().task("generation agreement", total=len(samples)) as task:
        for sample in samples:
            ref = generate(reference, sample, max_new_tokens)
            cand = generate(candidate, sample, max_new_tokens)
            forced = generate(candidate, sample, forced=ref.tokens)
            cosines = [_cosine(a, b) for a, b in zip(ref.logits, forced.logits)]
            prefix = _prefix(ref.tokens, cand.tokens)
            rows.append({
                "exact": ref.tokens == cand.tokens,
                "prefix": prefix / max(len(ref.tokens), 1), "prefix_tokens": prefix,
                "ter": edit_distance(ref.tokens, cand.tokens) / max(len(ref.tokens), 1),
                "cos_mean": float(np.mean(cosines)), "cos_min": float(np.min(cosines)),
                "top1": float(np.mean([int(np.argmax(f)) == t
                                       for f, t in zip(forced.logits, ref.tokens)])),
                "nll_ref": _nll(ref.logits, ref.tokens),
                "nll_cand": _nll(forced.logits, ref.tokens),
                "tokens": len(ref.tokens), "reference": ref.tokens, "candidate": cand.tokens,
            })
            checks.append(consistency(candidate, sample, max_new_tokens))
            task.advance()
    agreement = {
        "samples": len(rows),
        "exact_sequence": float(np.mean([r["exact"] for r in rows])),
        "prefix_agreement": float(np.mean([r["prefix"] for r in rows])),
        "steps_before_divergence": float(np.mean([r["prefix_tokens"] for r in rows])),
        "token_error_rate": float(np.mean([r["ter"] for r in rows])),
        "logits_cosine_mean": float(np.mean([r["cos_mean"] for r in rows])),
        "logits_cosine_min": float(np.min([r["cos_min"] for r in rows])),
        "forced_top1": float(np.mean([r["top1"] for r in rows])),
        "perplexity_reference": float(np.exp(np.mean([r["nll_ref"] for r in rows]))),
        "perplexity_candidate": float(np.exp(np.mean([r["nll_cand"] for r in rows]))),
        "new_tokens_mean": float(np.mean([r["tokens"] for r in rows])),
    }
    if decode is not None:
        ref_text = [decode(r["reference"]) for r in rows]
        cand_text = [decode(r["candidate"]) for r in rows]
        for row, a, b in zip(rows, ref_text, cand_text):
            row["reference_text"], row["candidate_text"] = a, b
        agreement["wer_candidate_vs_reference"] = word_error_rate(ref_text, cand_text)
        if labels is not None and len(labels) >= len(rows):
            truth = [str(label[0] if isinstance(label, (list, tuple)) else label)
                     for label in list(labels)[:len(rows)]]
            agreement["wer_reference_vs_truth"] = word_error_rate(truth, ref_text)
            agreement["wer_candidate_vs_truth"] = word_error_rate(truth, cand_text)
            encode = _encoder_of(reference)
            if encode is not None:
                agreement.update(text_perplexity(reference, candidate, samples, truth, encode)
                                 or {})
    merged = [c for c in checks if c]
    if merged:
        if any("with_past_same_token" in c for c in merged):
            agreement["candidate_with_past_same_token"] = float(np.mean(
                [c["with_past_same_token"] for c in merged if "with_past_same_token" in c]))
            agreement["candidate_with_past_max_abs"] = float(max(
                c["with_past_vs_full_prefix_max_abs"] for c in merged
                if "with_past_vs_full_prefix_max_abs" in c))
        if any("merged_same_tokens" in c for c in merged):
            agreement["candidate_merged_same_tokens"] = float(np.mean(
                [c["merged_same_tokens"] for c in merged if "merged_same_tokens" in c]))
    keys = ("reference", "candidate", "cos_min", "exact", "reference_text", "candidate_text")
    return {"agreement": agreement,
            "samples": [{k: r[k] for k in keys if k in r} for r in rows]}


# --- timing -------------------------------------------------------------------------------

def _path_tokens(parts: Parts, sample: dict, new_tokens: int) -> list[int]:
    """A fixed token path of ``new_tokens`` (the pipeline's own greedy output, repeated)."""
    tokens = generate(parts, sample, new_tokens).tokens or [0]
    while len(tokens) < new_tokens:
        tokens = tokens + tokens
    return tokens[:new_tokens]


def _with_context(parts: Parts, sample: dict, context: int | None) -> dict:
    if not context:
        return sample
    start = list(parts.manifest.generation.start_ids)
    filler = (start * (context // len(start) + 1))[:context]
    return {**sample, "prompt_ids": np.array([filler], np.int64)}


def bench_generation(folders: Sequence[str | os.PathLike], sample: dict[str, np.ndarray],
                     new_tokens: int = 16, context: int | None = None, runs: int = 5,
                     threads: int | None = 1, memory: bool = True) -> dict:
    """Interleaved generation timing of each pipeline folder on one sample (medians)."""
    pipelines = [open_parts(f, threads=threads) for f in folders]
    sample = _with_context(pipelines[0], sample, context)
    path = _path_tokens(pipelines[0], sample, new_tokens)
    first: dict[int, list[float]] = {i: [] for i in range(len(pipelines))}
    steps: dict[int, list[float]] = {i: [] for i in range(len(pipelines))}
    for parts in pipelines:  # warm up: sessions created, first runs done
        generate(parts, sample, forced=path[:2])
    with progress.current().task("generation timing", total=runs) as task:
        for _ in range(runs):
            for i, parts in enumerate(pipelines):
                g = generate(parts, sample, forced=path)
                first[i].append(g.first_token_s)
                steps[i].extend(g.step_s)
            task.advance()
    names = _names(folders)
    timing = {}
    for i, name in enumerate(names):
        per_token = np.array(steps[i]) * 1e3
        timing[name] = {
            "path": str(folders[i]),
            "first_token_ms": float(np.median(first[i]) * 1e3),
            "per_token_ms_p50": float(np.percentile(per_token, 50)) if per_token.size else None,
            "per_token_ms_p90": float(np.percentile(per_token, 90)) if per_token.size else None,
            "tokens_per_s": float(1e3 / np.median(per_token)) if per_token.size else None,
            "size_bytes": _folder_bytes(pipelines[i]),
        }
        if memory:
            timing[name]["peak_rss_mb"] = peak_rss_mb(folders[i], sample, path, threads)
    return {"timing": timing, "new_tokens": new_tokens, "context": context, "runs": runs,
            "threads": threads,
            "note": "tokens_per_s counts cached decoder steps only (the first token is timed "
                    "apart); steps follow one fixed token path in every pipeline"}


def _names(folders: Sequence[str | os.PathLike]) -> list[str]:
    names = [Path(f).name or str(f) for f in folders]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def _folder_bytes(parts: Parts) -> int:
    return sum(part_bytes(parts.manifest.path(part)) for part in parts.manifest.parts)


def peak_rss_mb(folder: str | os.PathLike, sample: dict, path: list[int],
                threads: int | None) -> float:
    """Peak resident memory (MB) of a child process that opens the pipeline and generates
    along ``path``: weights, sessions and the key/value cache."""
    with tempfile.TemporaryDirectory() as scratch:
        sample_file = Path(scratch) / "sample.npz"
        np.savez(sample_file, **sample)
        result = subprocess.run(
            [sys.executable, "-m", "onnxcomp.measure.generation", str(folder), str(sample_file),
             json.dumps(path), str(threads or 0)],
            capture_output=True, text=True, timeout=3600, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory child failed: {result.stderr.strip().splitlines()[-1:]}")
    return float(result.stdout.strip().splitlines()[-1])


def _child(argv: list[str]) -> None:
    # VmHWM, not ru_maxrss: exec keeps the parent's ru_maxrss (see bench.peak_bytes).
    from onnxcomp.measure.bench import peak_bytes

    folder, sample_file, path, threads = argv
    with np.load(sample_file) as npz:
        sample = {k: npz[k] for k in npz.files}
    parts = open_parts(folder, threads=int(threads) or None)
    generate(parts, sample, forced=json.loads(path))
    print(peak_bytes() / 2**20)


if __name__ == "__main__":
    _child(sys.argv[1:])
