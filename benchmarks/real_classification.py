"""Few-shot classification on the real 2D sets of ``benchmarks/real/classification/`` (see ``benchmarks/real/README.md``),
against chance and the raw-pixel baseline, on the same seeded episodes for every method.

    python -m benchmarks.real_classification \
        --checkpoints results/runs/protonet_cls/version_0/checkpoints/best.ckpt ... \
        --episodes 100 --out benchmarks/results/real_classification.json

Every method classifies the queries of an episode against its whole support set, with each checkpoint's own
preprocessing (`imaging_meta.commands.classify.loader_settings`), in one episode, through
`imaging_meta.commands.classify.predict_queries`, what ``imaging-meta classify`` runs (``--per-query``: one
episode per query; the same answers to rounding, since no learner's prediction for a query depends on the other
queries). Methods:

* ``chance``: 1 / N;
* ``pixels``: the nearest class mean of 32 x 32 pixels (every channel of colour images) (`DescriptorClassifier`, ``configs/model/pixels_cls.yaml``),
  ``histogram``: of 32-bin intensity histograms, ``radiomics`` when the optional extra is installed;
* per checkpoint ``<name>``: the learner as trained; ``<name> + task-adaptive``: `TaskAdaptiveClassifier` around
  it (leave-one-out over the support picks the embedding, pixels, histogram or their fusion); and, with
  ``--finetune-steps``, ``<name> + fine-tune``: a new head fitted on the augmented support.

Episodes: N-way (every class of the set, or ``--ways``) K-shot, up to ``--queries`` queries per class. Neither a query nor
another support item lies within ``--gap`` slices of a support item of the same class from the same scan
(neighbouring slices are near copies, which would flatter raw pixels and the leave-one-out estimates alike). Each episode's accuracy is the mean over its queries; the table gives the mean over episodes with
a 95% Student's t interval, and each method's paired difference from ``pixels`` on the same episodes.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import DATA_CONFIGS, load_yaml
from imaging_meta.checkpoint_io import load_learner
from imaging_meta.commands.classify import loader_settings, predict_queries, support_folder
from imaging_meta.evaluation.statistics import mean_ci
from imaging_meta.learners.base import Learner

SETS = Path(__file__).resolve().parent / "real" / "classification"
NAME = re.compile(r"^(?P<scan>[a-z]+[0-9]*)_z(?P<z>[0-9]+)")


def descriptor_learners(finetune_steps: int = 0) -> dict[str, Learner]:
    from imaging_meta.learners.descriptors.classifier import DescriptorClassifier

    out: dict[str, Learner] = {
        "pixels": DescriptorClassifier(features="pixels", pixel_size=32),
        "histogram": DescriptorClassifier(features="histogram", bins=32),
        "gradient": DescriptorClassifier(features="gradient", bins=32),
        "orientation": DescriptorClassifier(features="orientation", pixel_size=32),
    }
    from imaging_meta.learners.descriptors.radiomics import available

    if available():  # the optional radiomics extra
        out["radiomics"] = DescriptorClassifier(features="radiomics")
    return out


def descriptor_settings() -> dict:
    """How the standalone descriptor rows read the images: at the image size of the classification data config
    (`configs/data/folder_classification.yaml`, as `make results`' checkpoints were trained, so that each row
    is the space the task-adaptive default weighs; until 2026-12-07 they read 64 x 64, where the gradient
    histogram is another descriptor: a review), colour images in colour (grey ones are described as grey:
    `features.shared_channels`)."""
    config = load_yaml(DATA_CONFIGS / "folder_classification.yaml")["data"]["init_args"]["source"]["init_args"]
    return {"image_size": [int(s) for s in config["image_size"]], "channels": 3,
            "ct_window": [float(v) for v in config["ct_window"]]}


def checkpoint_learners(
    paths: list[str], finetune_steps: int, adaptive_options: dict | None = None
) -> dict[str, tuple[Learner, dict]]:
    """Per checkpoint: the learner, `TaskAdaptiveClassifier` around it (with ``adaptive_options``, e.g. ``rule``
    and ``prior``; its defaults without), and with ``finetune_steps`` the support fine-tuning."""
    from imaging_meta.learners.descriptors.task_adaptive import TaskAdaptiveClassifier

    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise ValueError(f"checkpoint {twice[0]} is given twice")
    out = {}
    for p in paths:
        learner, extra = load_learner(p, "cpu")
        learner.eval()
        name = Path(p).parts[-4] if len(Path(p).parts) >= 4 else Path(p).stem
        if name in out:  # two checkpoints of one run (version_0 and version_1, best and last): one was dropped
            name = str(Path(p).with_suffix(""))
        settings = loader_settings(extra, learner)
        out[name] = (learner, settings)
        adaptive = TaskAdaptiveClassifier(learner, **(adaptive_options or {})).eval()
        out[f"{name} + task-adaptive"] = (adaptive, loader_settings(extra, adaptive))  # colour kept for descriptors
        if finetune_steps:
            from imaging_meta.learners.transfer.support_finetune import with_support_finetuning

            out[f"{name} + fine-tune"] = (with_support_finetuning(learner, finetune_steps).eval(), settings)
    return out


def sample_episodes(
    items: list[tuple[Path, int]],
    n_classes: int,
    ways: int,
    shot: int,
    queries: int,
    gap: int,
    episodes: int,
    seed: int,
) -> list[tuple[list[int], list[int], list[int]]]:
    """Seeded episodes as (classes, support item indices, query item indices). A draw that finds too few support
    items or no query for a class is left out (only that episode; the caller counts them), so fewer than
    ``episodes`` may come back, and none when the set is too small."""
    meta = []
    for f, y in items:
        m = NAME.match(f.name)
        meta.append((y, m["scan"] if m else f.stem, int(m["z"]) if m else -(10**6)))
    by_class = {c: [i for i, (y, _, _) in enumerate(meta) if y == c] for c in range(n_classes)}
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        classes = sorted(rng.choice(n_classes, size=ways, replace=False).tolist())
        support, query, drawn = [], [], True
        for c in classes:
            pool = rng.permutation(by_class[c]).tolist()
            s, near = [], set()
            for i in pool:  # support items of a class at least ``gap`` slices apart within a scan
                if len(s) < shot and (meta[i][1], meta[i][2]) not in near:
                    s.append(i)
                    near |= {(meta[i][1], z) for z in range(meta[i][2] - gap + 1, meta[i][2] + gap)}
            q = [i for i in pool if i not in s and (meta[i][1], meta[i][2]) not in near][:queries]
            if len(s) < shot or not q:
                drawn = False  # the rest of this episode's classes are still drawn: the next episodes stay as they were
            support += s
            query += q
        if drawn:
            out.append((classes, support, query))
    return out


def predict_one_by_one(learner: Learner, s_images, s_labels, classes, q_images) -> tuple[torch.Tensor, list]:
    """`predict_queries` with one episode per query (``--per-query``): the same answers to rounding, since no
    learner's prediction for a query depends on the other queries (``tests/imaging_meta/test_non_transductive.py``)."""
    out = [predict_queries(learner, s_images, s_labels, classes, q[None], first_index=j) for j, q in enumerate(q_images)]
    return torch.cat([p for p, _ in out]), [c for _, ch in out for c in ch]


def run_set(name: str, methods: dict, shots: list[int], args) -> list[dict]:
    classes, items = support_folder(SETS / name)
    cache: dict[tuple, torch.Tensor] = {}

    def images(idx: list[int], settings: dict) -> torch.Tensor:
        from datamodules.sources.image_folder import load_image

        key = json.dumps(settings, sort_keys=True)
        for i in idx:
            if (key, i) not in cache:
                cache[key, i] = load_image(items[i][0], **settings)
        return torch.stack([cache[key, i] for i in idx])

    rows = []
    ways = min(args.ways or len(classes), len(classes))
    for shot in shots:
        eps = sample_episodes(
            items, len(classes), ways, shot, args.queries, args.gap, args.episodes, args.seed
        )
        if not eps:
            print(f"{name}: too few images for {ways}-way {shot}-shot with {args.gap}-slice gap; skipped")
            continue
        if len(eps) < args.episodes:
            print(f"{name}: {args.episodes - len(eps)} of {args.episodes} {ways}-way {shot}-shot episodes could not "
                  f"be drawn with a {args.gap}-slice gap (too few images of a class); scored on the other {len(eps)}")
        per_method: dict[str, list[float]] = {"chance": [1.0 / ways] * len(eps)}
        confidence: dict[str, list[float]] = {}  # each episode's mean top probability
        choices: dict[str, dict[str, int]] = {}
        seconds: dict[str, float] = {}
        for mname, (learner, settings) in methods.items():
            if getattr(learner, "n_way", None) not in (None, ways):
                continue  # an n-way head of another size
            t0, accs, tops = time.perf_counter(), [], []
            for cls, s_idx, q_idx in eps:
                relabel = {c: k for k, c in enumerate(cls)}
                s_labels = torch.tensor([relabel[items[i][1]] for i in s_idx])
                q_labels = torch.tensor([relabel[items[i][1]] for i in q_idx])
                predict = predict_one_by_one if args.per_query else predict_queries
                probs, ch = predict(
                    learner, images(s_idx, settings), s_labels, [classes[c] for c in cls], images(q_idx, settings)
                )
                accs.append(float((probs.argmax(-1) == q_labels).float().mean()))
                tops.append(float(probs.max(-1).values.mean()))
                if ch and ch[0]:  # the same support for every query of an episode: one choice per episode
                    choices.setdefault(mname, {}).setdefault(ch[0]["space"], 0)
                    choices[mname][ch[0]["space"]] += 1
            per_method[mname] = accs
            confidence[mname] = tops
            seconds[mname] = time.perf_counter() - t0
        for mname, accs in per_method.items():
            mean, half = mean_ci(accs)
            diff = [a - b for a, b in zip(accs, per_method["pixels"], strict=True)]
            dmean, dhalf = mean_ci(diff)
            base = per_method.get(mname.split(" + ")[0]) if " + " in mname else None
            bmean, bhalf = mean_ci([a - b for a, b in zip(accs, base, strict=True)]) if base else (None, None)
            rows.append(
                {
                    "set": name,
                    "ways": ways,
                    "shot": shot,
                    "method": mname,
                    "episodes": len(eps),
                    "episodes_not_drawn": args.episodes - len(eps),
                    "accuracy": mean,
                    "ci": half,
                    "minus_pixels": dmean,
                    "minus_pixels_ci": dhalf,
                    "minus_learned": bmean,
                    "minus_learned_ci": bhalf,
                    "choices": choices.get(mname),
                    # the mean top probability: near the accuracy when the probabilities are calibrated
                    "confidence": round(float(np.mean(confidence[mname])), 4) if mname in confidence else None,
                    "seconds": round(seconds.get(mname, 0.0), 1),
                }
            )
            print(
                f"{name:18s} {ways}-way {shot}-shot {mname:40s} {mean:.3f} ± {half:.3f}   vs pixels {dmean:+.3f} ± {dhalf:.3f}"
                + (f"   chosen {choices[mname]}" if mname in choices else ""),
                flush=True,
            )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| set | episode | method | accuracy (95% CI) | minus pixels (paired) | minus the learner alone (paired) | chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ch = ", ".join(f"{k} {v}" for k, v in sorted(r["choices"].items())) if r["choices"] else ""
        diff = "" if r["method"] == "pixels" else f"{r['minus_pixels']:+.3f} ± {r['minus_pixels_ci']:.3f}"
        own = "" if r["minus_learned"] is None else f"{r['minus_learned']:+.3f} ± {r['minus_learned_ci']:.3f}"
        lines.append(
            f"| {r['set']} | {r['ways']}-way {r['shot']}-shot | {r['method']} | "
            f"{r['accuracy']:.3f} ± {r['ci']:.3f} | {diff} | {own} | {ch} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--checkpoints", nargs="*", default=[], help="classification checkpoints (imaging-meta fit)"
    )
    ap.add_argument("--sets", nargs="*", default=sorted(p.name for p in SETS.iterdir() if p.is_dir()))
    ap.add_argument("--shots", nargs="*", type=int, default=[1, 3, 5])
    ap.add_argument(
        "--ways", type=int, default=None, help="classes per episode (default: every class of the set)"
    )
    ap.add_argument("--queries", type=int, default=5, help="queries per class, at most")
    ap.add_argument(
        "--gap",
        type=int,
        default=2,
        help="a query lies at least this many slices from a support item of its class and scan",
    )
    ap.add_argument("--episodes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-query", action="store_true", help="one episode per query, exactly as classify runs (slower)")
    ap.add_argument(
        "--finetune-steps", type=int, default=0, help="also score each checkpoint fine-tuned on the support"
    )
    ap.add_argument(
        "--rule", choices=["weighted", "select"], default=None,
        help="the task-adaptive rule (default: the classifier's own, weighted)",
    )
    ap.add_argument(
        "--prior", type=float, default=None,
        help="the weighted rule's pull toward equal weights, in held-out items (default: the classifier's own)",
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="write the rows as JSON and a Markdown table beside it"
    )
    args = ap.parse_args(argv)
    adaptive_options = {k: v for k, v in (("rule", args.rule), ("prior", args.prior)) if v is not None}
    torch.manual_seed(args.seed)
    methods = {k: (v, descriptor_settings()) for k, v in descriptor_learners().items()}
    methods.update(checkpoint_learners(args.checkpoints, args.finetune_steps, adaptive_options))
    rows = []
    for name in args.sets:
        rows += run_set(name, methods, args.shots, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1)
        )
        args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
