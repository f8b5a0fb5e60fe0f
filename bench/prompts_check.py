"""Does today's code give a published evaluation's prompts? Rebuild them on the CPU and compare (no GPU, no model).

    python bench/prompts_check.py docs/data/<lease>/eval_<model>_<L>/samples_<model>.jsonl.gz --length L
        [--suite niah6] [--limit 100] [--haystack PATH] [--tokenizer embedded]

lm-eval's RULER generators draw from one stream seeded per run, so a task's prompts depend on the suite, lengths,
limit, haystack and tokenizer of the run (docs/EVAL.md). This runs lm-eval's own evaluation of those tasks at one
length with a model that answers nothing (seconds to a minute: only the prompts are built), takes the prompt
digests of what it built (``ds_hybrid.evaluation.recall.prompt_digests``: each prompt's id and answers) and compares
them, task by task, with those of a samples file a campaign wrote (one model, one length: the campaigns' layout).
Prints one line per task; exits 1 if any task's prompts differ, so that a lease's new rows would not merge with the
published ones (``eval-merge`` refuses them), 0 if all agree.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rebuilt_samples(tasks: list[str], length: int, limit: int, haystack: str | None, tokenizer: str) -> list[dict]:
    """The samples records of an evaluation of ``tasks`` at ``length`` whose model answers nothing."""
    from lm_eval.api.model import LM

    from ds_hybrid.evaluation import recall

    recall.prepare_offline()
    from ds_hybrid.evaluation.haystack import haystack_words
    from ds_hybrid.teacher import resolve_teacher

    class Mute(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return ["" for _ in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    hay = haystack_words(haystack) if any(t in recall.ESSAY_TASKS for t in tasks) else None
    specs = recall.ruler_configs(tasks, [length], resolve_teacher(tokenizer, "--tokenizer"), hay, limit)
    return recall.samples_from(recall.run_tasks(Mute(), specs, None, 0))


def compare(published: list[dict], rebuilt: list[dict]) -> dict[str, bool]:
    """{task: whether its prompts agree} over the tasks and lengths of the published records."""
    from ds_hybrid.evaluation.recall import prompt_digests

    pub, new = prompt_digests(published), prompt_digests(rebuilt)
    return {t: all(new.get(t, {}).get(L, {}).get("golds") == d["golds"] for L, d in row.items())
            for t, row in pub.items()}


def main(argv: list[str] | None = None) -> int:
    from ds_hybrid.evaluation.recall import SUITES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("samples", help="a samples_<model>.jsonl[.gz] of `ds-hybrid eval` (one length)")
    ap.add_argument("--length", type=int, required=True, help="the length it was evaluated at")
    ap.add_argument("--suite", default="niah6", choices=sorted(SUITES), help="the suite it ran (default niah6)")
    ap.add_argument("--limit", type=int, default=100, help="its --limit (default 100)")
    ap.add_argument("--haystack", default=None, help="its --haystack (default: the embedded corpus's held-out prose)")
    ap.add_argument("--tokenizer", default="embedded", help="the evaluated model's tokenizer folder (default: the "
                    "embedded teacher's)")
    args = ap.parse_args(argv)
    opener = gzip.open if args.samples.endswith(".gz") else open
    with opener(args.samples, "rt") as f:
        published = [json.loads(line) for line in f if line.strip()]
    same = compare(published, rebuilt_samples(SUITES[args.suite], args.length, args.limit, args.haystack,
                                              args.tokenizer))
    for task, ok in same.items():
        print(f"{task} at {args.length}: {'the same prompts' if ok else 'OTHER PROMPTS'}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
