"""Presentation of the results: plain-text/markdown tables per measurement, the JSON file
and the scaling plot (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

JAX, TORCH = "gist_jax", "transformers"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (also readable as plain text)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(vals: list[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"

    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(out + [line(r) for r in cells])


def _ms(t: dict[str, Any]) -> str:
    return f"{t['median_s'] * 1e3:.0f} ms (±{t['spread'] * 50:.0f}%)"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def peak_table(r: dict[str, Any]) -> str:
    rows = [
        [f"matmul f32 {m['n']}^3 ({lib})", f"{v['flops_per_s'] / 1e9:.1f} GFLOP/s"]
        for m in r.get("matmul_by_size", [r["matmul"]])
        for lib, v in m["libraries"].items()
    ]
    rows += [
        [f"streaming read ({lib})", f"{v['bytes_per_s'] / 1e9:.1f} GB/s"]
        for lib, v in r["bandwidth"]["libraries"].items()
    ]
    if r.get("nominal"):
        n = r["nominal"]
        rows.append(
            [
                f"nominal: {n['cores']} cores x {n['flops_per_cycle']} FLOP/cycle x "
                f"{n['clock_hz'] / 1e9:.2f} GHz",
                f"{n['flops'] / 1e9:.1f} GFLOP/s",
            ]
        )
    return table(["machine ceiling", "value"], rows)


def train_table(r: dict[str, Any]) -> str:
    rows = []
    for name, e in r["implementations"].items():
        row = [
            name,
            _ms(e["step"]),
            f"{e['tokens_per_s']:.0f}",
            f"{e['flops_per_s'] / 1e9:.1f}",
            _pct(e.get("mfu_measured_peak")),
            _pct(e.get("mfu_same_minutes")),
            _pct(e.get("mfu_nominal_peak")),
        ]
        if "breakdown_s" in e:
            b = e["breakdown_s"]
            row.append(
                f"{b['forward'] * 1e3:.0f} / {b['backward'] * 1e3:.0f} / "
                f"{b['optimizer_and_rest'] * 1e3:.0f}"
            )
        rows.append(row)
    headers = [
        "impl",
        "step",
        "tokens/s",
        "GFLOP/s",
        "MFU (measured)",
        "MFU (same minutes)",
        "MFU (nominal)",
    ]
    if rows and len(rows[0]) == 8:
        headers.append("fwd / bwd / opt ms")
    out = [
        f"Train step, {r['model']}, batch {r['batch_size']} x {r['length']} "
        f"({r['useful_tokens_per_step']} non-pad tokens), {r['reps']} reps",
        table(headers, rows),
        f"gist_jax compile: {r['implementations'][JAX]['compile_s']:.1f} s",
    ]
    j = r["implementations"][JAX]
    if j.get("loss_chunk"):
        executed = j["executed"]
        out.append(
            f"gist_jax runs the output layer at {j['output_positions_computed']} of "
            f"{r['tokens_per_step']} positions (loss chunks of {j['loss_chunk']}); MFU above "
            "counts the full model's FLOPs (as transformers computes them); counting what "
            f"gist_jax executes: {j['executed_step_flops'] / 1e9:.0f} GFLOP/step, "
            f"{executed['flops_per_s'] / 1e9:.1f} GFLOP/s, "
            f"MFU {_pct(executed.get('mfu_measured_peak'))} of the measured peak, "
            f"{_pct(executed.get('mfu_same_minutes'))} of the same minutes' peak"
        )
    if "peak_same_minutes" in r:
        same = r["peak_same_minutes"]
        out.append(
            f"peak product timed between the steps: {same['flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"(spread {same['timing']['spread']:.0%}); MFU (same minutes) is the median over "
            "repetitions of each step's rate over the peak measured next to it"
        )
    if "speedup_vs_transformers" in r:
        out.append(
            f"speed-up gist_jax vs transformers: {_ratio(r['speedup_vs_transformers'])} "
            f"(first-step loss |diff| {r['loss_abs_diff']:.2e})"
        )
    if "breakdown_speedup" in r:
        out.append(
            "per part: " + ", ".join(f"{k} {_ratio(v)}" for k, v in r["breakdown_speedup"].items())
        )
    return "\n".join(out)


def decode_table(r: dict[str, Any]) -> str:
    rows = []
    for batch, e in r["batches"].items():
        for name in (JAX, TORCH):
            if name not in e:
                continue
            rows.append(
                [
                    batch,
                    name,
                    _ms(e[name]["call"]),
                    f"{e[name]['tokens_per_s']:.1f}",
                    _pct(e[name].get("fraction_of_bandwidth_bound")),
                    _ratio(e.get("speedup_vs_transformers")) if name == JAX else "",
                ]
            )
    out = [
        f"Greedy decoding, {r['model']}, {r['prompt_length']}-token prompts, "
        f"{r['new_tokens']} new tokens, {r['reps']} reps",
        table(["batch", "impl", "call", "tokens/s", "of BW bound", "speed-up"], rows),
    ]
    for batch, e in r["batches"].items():
        if "bandwidth_bound_tokens_per_s" in e:
            out.append(
                f"batch {batch} bandwidth bound: {e['bandwidth_bound_tokens_per_s']:.1f} tokens/s "
                f"({r['weight_bytes'] / 1e6:.0f} MB of weights per token)"
            )
        if "agreement" in e:
            a = e["agreement"]
            out.append(
                f"batch {batch}: {a['identical_rows']}/{a['rows']} identical outputs, "
                f"mean common prefix {a['mean_common_prefix_tokens']:.1f} tokens"
            )
    return "\n".join(out)


def gist_table(r: dict[str, Any]) -> str:
    rows = []
    for cond, e in r["conditions"].items():
        rows.append(
            [
                cond,
                f"{e['tokens_run']:.1f}",
                f"{e['flops'] / 1e9:.2f}",
                _pct(e["flops_reduction_vs_no_caching"]),
                f"{e['latency_s'] * 1e3:.1f}",
                _pct(e["latency_reduction_vs_no_caching"]),
                f"{e['cache_bytes_per_prompt'] / 1e3:.0f}",
            ]
        )
    return "\n".join(
        [
            f"Prompt caching, {r['model']}, {r['num_prompts']} prompts of {r['dataset']}, "
            f"batch 1, k={r['num_gist']}: mean compression {r['mean_compression_ratio']:.1f}x "
            f"(instruction {r['mean_instruction_tokens']:.1f} tokens, input "
            f"{r['mean_input_tokens']:.1f})",
            table(
                [
                    "condition",
                    "tokens run",
                    "GFLOPs (XLA)",
                    "FLOPs saved",
                    "latency ms",
                    "latency saved",
                    "cache KB/prompt",
                ],
                rows,
            ),
        ]
    )


def scaling_table(r: dict[str, Any]) -> str:
    out = []
    sweeps = [
        ("sequence_length", "length", "Train step vs sequence length"),
        ("batch_size", "batch", "Train step vs batch size"),
        ("packing", "rows", "Packing vs padding (useful tokens/s)"),
    ]
    for key, label, title in sweeps:
        section = r.get(key)
        if not section:
            continue
        rows = []
        for name, e in section["results"].items():
            rows.append(
                [
                    name,
                    "x".join(map(str, e["shapes"][0])),
                    f"{e[JAX]['useful_tokens_per_s']:.0f}",
                    f"{e[TORCH]['useful_tokens_per_s']:.0f}" if TORCH in e else "-",
                    _ratio(e.get("speedup_vs_transformers")),
                ]
            )
        out += [
            title,
            table([label, "shape", "gist_jax tok/s", "transformers tok/s", "ratio"], rows),
        ]
    return "\n".join(out)


TABLES = {
    "peak": peak_table,
    "train": train_table,
    "decode": decode_table,
    "gist": gist_table,
    "scaling": scaling_table,
}


def write_json(path: str | os.PathLike, results: dict[str, Any]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def plot_scaling(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Tokens/s by sequence length for both implementations (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    section = result["sequence_length"]["results"]
    lengths = [int(k) for k in section]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in ((JAX, "o"), (TORCH, "s")):
        if all(name in section[str(n)] for n in lengths):
            ax.plot(
                lengths,
                [section[str(n)][name]["useful_tokens_per_s"] for n in lengths],
                marker=marker,
                label=name,
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("sequence length (tokens per row)")
    ax.set_ylabel("train tokens/s (non-padding)")
    tokens = result["sequence_length"]["tokens_per_step"]
    ax.set_title(f"Train step throughput, {result['model']}, {tokens} tokens/step")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
