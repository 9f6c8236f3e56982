"""The markdown of `make benchmark` (benchmarks/demo_benchmark.py): benchmark.md and diagnostics.md."""


HEADERS = {"generated_chosen": "generated chosen", "kept": "kept", "true_generated": "true reward generated",
           "true_chosen": "chosen", "true_rejected": "rejected", "distinct_samples": "distinct of n",
           "held_out_distinct": "held-out distinct", "held_out_new": "new held-out answers",
           "kl_previous": "KL(π_K ‖ π_K−1)"}


def fmt(d: dict | None, digits: int = 4) -> str:
    if d is None:
        return "–"
    if d["std"] is None:
        return f"{d['mean']:.{digits}f}"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def ci(d: dict) -> str:
    return f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d["ci95"] else "(one seed: no interval)"


def verdict(d: dict) -> str:
    if not d["ci95"]:
        return "one seed: no interval"
    if d["ci95"][0] > 0:
        return "better: the interval excludes 0"
    if d["ci95"][1] < 0:
        return "worse: the interval excludes 0"
    return "no difference shown: the interval includes 0"


def _count(d: dict | None) -> str:
    return "–" if d is None else f"{d['mean']:,.0f}"


def to_markdown(result: dict, sweep: list[dict] | None) -> str:
    seeds, last, methods = result["seeds"], result["last_iteration"], result["methods"]
    label = {m["name"]: m["label"] for m in methods}
    base = result["baseline"]
    lines = [f"# Methods on the sorting task ({len(seeds)} seeds: {', '.join(map(str, seeds))})", "",
             "Held-out mean true reward of greedy answers, mean ± standard deviation over seeds "
             "(base = the SFT model every method starts from):", "",
             "| iteration | " + " | ".join(label[m["name"]] for m in methods) + " |", "|---|" + "---|" * len(methods)]
    for it in result["iterations"]:
        lines.append(f"| {it} | " + " | ".join(fmt(result["per_iteration"][it][m["name"]]) for m in methods) + " |")
    lines += ["", f"Paired difference against {label[base]} (method − {label[base]}, per seed, then mean and 95% t "
              "interval over seeds):", "",
              "| method | " + " | ".join(f"iteration {it}" for it in result["iterations"] if it != "base")
              + " | at the last iteration |", "|---|" + "---|" * len(result["iterations"])]
    for m, by_it in result["paired_difference"].items():
        cells = [f"{by_it[it]['mean']:+.4f} {ci(by_it[it])}" for it in result["iterations"] if it != "base"]
        lines.append(f"| {label[m]} | " + " | ".join(cells) + f" | {verdict(by_it[last])} |")
    lines += ["", "Cost per run (mean over seeds, all iterations; ranker calls = candidates scored in the rank stage, "
              "the evaluations' scoring not counted; training tokens = the trainer's `num_tokens`; seconds = the "
              "stage processes' wall time, interpreter start included, two runs at a time on 2 shared cores):", "",
              "| method | generated responses | ranker calls | training tokens | generate s | rank s | train s "
              "| evaluate s | all stages s |", "|---|---|---|---|---|---|---|---|---|"]
    for m in methods:
        c = result["costs"][m["name"]]
        lines.append(f"| {label[m['name']]} | {_count(c['generated_responses'])} | {_count(c['ranker_calls'])} | "
                     f"{_count(c['training_tokens'])} | "
                     + " | ".join(f"{c[f'{st}_seconds']['mean']:.0f}" for st in ("generate", "rank", "train", "evaluate"))
                     + f" | {c['total_seconds']['mean']:.0f} |")
    lines += ["", f"At iteration {last}, at a glance (means over seeds; diagnostics.md has every iteration):", "",
              f"| method | held-out mean ± std | − {label[base]} [95% t interval] | generated chosen (ReST: kept) "
              "| true reward of the chosen | KL(π_K ‖ π_K−1) | held-out distinct answers | ranker calls |",
              "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        name, d = m["name"], result["diagnostics"][m["name"]][last]
        diff = result["paired_difference"].get(name, {}).get(last)
        chosen = d["kept"] if d["kept"] is not None else d["generated_chosen"]
        lines.append(f"| {label[name]} | {fmt(result['per_iteration'][last][name])} | "
                     + (f"{diff['mean']:+.4f} {ci(diff)}" if diff else "(baseline)")
                     + f" | {fmt(chosen, 3)} | {fmt(d['true_chosen'], 3)} | {fmt(d['kl_previous'], 3)} | "
                     f"{fmt(d['held_out_distinct'], 2)} | {_count(result['costs'][name]['ranker_calls'])} |")
    lines += ["", f"Per seed at iteration {last}:", "", "| seed | " + " | ".join(label[m["name"]] for m in methods) + " |",
              "|---|" + "---|" * len(methods)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{result['per_seed'][m['name']][s][last]:.4f}" for m in methods) + " |")
    if sweep:
        lines += ["", f"Alpha sweep (seed {seeds[0]}, held-out metric at the last iteration; α = 0 is iterative DPO):",
                  "", "| α | mean ± s.e. | win rate | empty answers | mean answer tokens |", "|---|---|---|---|---|"]
        for r in sweep:
            lines.append(f"| {r['alpha']:g} | {r['mean']:.4f} ± {r['sem']:.4f} | {r['win_rate']:.3f} | "
                         f"{r['empty_answers']} / {r['num_prompts']} | {r['mean_answer_tokens']:.1f} |")
    lines += ["", "Exploration diagnostics per iteration: diagnostics.md."]
    return "\n".join(lines) + "\n"


def diagnostics_markdown(result: dict) -> str:
    s, label = result["kl_settings"], {m["name"]: m["label"] for m in result["methods"]}
    lines = [f"# Exploration diagnostics per iteration ({len(result['seeds'])} seeds; mean ± std over seeds)", "",
             "- generated chosen: share of the ranked rows whose chosen response is a generated one (ReST: 1 by "
             "construction; kept = the share of generated responses its filter kept);",
             "- true reward: mean exact reward (recomputed, not the ranker's score) of all generated responses, of "
             "the chosen and of the rejected responses of the ranked rows;",
             "- distinct of n: distinct responses among a prompt's n samples (n > 1 only);",
             "- held-out distinct: distinct greedy answers a held-out prompt received from base to iteration K; "
             "new: share of held-out prompts whose iteration-K answer no earlier evaluation gave;",
             f"- KL(π_K ‖ π_K−1): {s['estimator']}; {s['prompts']} prompts × {s['samples_per_prompt']} samples "
             f"= {s['prompts'] * s['samples_per_prompt']} per iteration and run (selm/policy_kl.py).", ""]
    for m, by_it in result["diagnostics"].items():
        keys = [k for k in ("generated_chosen", "kept", "true_generated", "true_chosen", "true_rejected",
                            "distinct_samples", "held_out_distinct", "held_out_new", "kl_previous")
                if k != "kept" or any(d["kept"] for d in by_it.values())]
        lines += [f"## {label[m]}", "", "| iter | " + " | ".join(HEADERS[k] for k in keys) + " |",
                  "|---|" + "---|" * len(keys)]
        for it, d in by_it.items():
            lines.append(f"| {it} | " + " | ".join(fmt(d[k], 3) for k in keys) + " |")
        lines.append("")
    return "\n".join(lines)
