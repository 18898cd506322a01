r"""Writing a :class:`~probgen.apps.compare.CompareResult`: Markdown table, JSON and a sample panel.

``compare.md`` has one row per method plus the floor rows, the NLL estimator of each row
spelled out under the table (a bound is not an exact value), and the budget; ``compare.json``
holds everything :func:`~probgen.apps.compare.compare` measured; ``compare.png`` shows the
data next to each method's samples (scatters for 2-D data, image grids for images).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from probgen.checkpoint import atomic_write_bytes, write_json_atomic
from probgen.data import TOYS, load_dataset
from probgen.plotting import save_image_panel, save_scatter_panel

__all__ = ["markdown_table", "save_panel", "write_report"]

_NA = "–"


def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return _NA
    return format(value, fmt)


def _short_kind(kind: str | None) -> str:
    """The first clause of an estimator's description: ``"IWAE bound"``, ``"exact log-likelihood"``."""
    if not kind:
        return "no estimator"
    short = kind.split("(")[0].split(";")[0].strip()
    return short + (" + dequantization" if "turned into a bound" in kind else "")


def _nfe(value: float | None) -> str:
    if value is None:
        return _NA
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def _modes(cov: dict[str, Any] | None) -> str:
    if not cov:
        return _NA
    return f"{cov['modes_captured']}/{cov['num_modes']} ({cov['high_quality_fraction']:.0%} hq)"


def _notes(row: dict[str, Any]) -> str:
    if row["status"] != "ok":
        return f"**{row['status']}** ({row['stage']}): {row['reason']}".replace("|", "\\|")
    best = f", best at {row['best_step']}" if row.get("best_step") is not None else ""
    return f"{row['trained_steps']} steps{best}"


def markdown_table(result: Any) -> str:
    """The Markdown of ``compare.md``: heading, table, NLL estimators, budget line."""
    floors, budget = result.floors, result.budget
    fd = floors["metric"] == "frechet_distance"
    levels = "independent_pixels" in floors
    dvd = floors["data_vs_data"]
    unit = "bits/dim" if levels else "nats"
    if fd:
        quality = [f"FD (floor {dvd['frechet_distance']:.2f})"]
    else:
        quality = [f"SW (floor {dvd['sliced_wasserstein']:.4f})", f"MMD (floor {dvd['mmd']:.5f})"]
    mixture = not fd and "mode_coverage" in dvd
    header = ["method", f"NLL ({unit})", "NLL is", *quality]
    header += ["modes (floor " + _modes(dvd["mode_coverage"]).split(" ")[0] + ")"] if mixture else []
    header += ["train s", "sample s", "NFE/sample", "sampler", "notes"]

    def quality_cells(metrics: dict[str, Any]) -> list[str]:
        if fd:
            return [_num(metrics.get("frechet_distance"), ".2f")]
        cells = [_num(metrics.get("sliced_wasserstein"), ".4f"), _num(metrics.get("mmd"), ".5f")]
        return cells + ([_modes(metrics.get("mode_coverage"))] if mixture else [])

    def floor(name: str, nll: float | None, kind: str, metrics: dict | None, note: str) -> list[str]:
        cells = quality_cells(metrics) if metrics else [_NA] * (len(quality) + mixture)
        return [f"*floor: {name}*", _num(nll), kind if nll is not None else _NA, *cells, *[_NA] * 4, note]

    if levels:
        ip = floors["independent_pixels"]
        lines = [
            floor("data", None, "", dvd, dvd["reference"]),
            floor("independent pixels", ip["nll_bits_per_dim"], "exact", ip, "categoricals fit to train"),
            floor("uniform", floors["uniform_bits_per_dim"], "exact", None, ""),
        ]
    else:
        lines = [floor("data", floors.get("entropy_nats"), "entropy (exact)", dvd, dvd["reference"])]
    estimators = []
    for row in result.rows:
        if row["status"] != "ok":
            lines.append([row["method"], *[_NA] * (len(header) - 2), _notes(row)])
            continue
        nll, sec = row["nll"], row["seconds"]
        value = nll["bits_per_dim"] if levels else nll["nats"]
        cell = _num(value)
        if value is not None and not levels and nll.get("nats_stderr") is not None:
            cell += f" ± {nll['nats_stderr']:.3f}"
        lines.append(
            [
                row["method"],
                cell,
                _short_kind(nll.get("kind")),
                *quality_cells(row["samples"]),
                _num(sec["train"], ".1f"),
                _num(sec["sampling"], ".1f"),
                _nfe(row["nfe_per_sample"]),
                row["sampler"],
                _notes(row),
            ]
        )
        estimators.append(f"- {row['method']}: {nll['kind'] or nll.get('reason')}")
    out = [f"### {result.data} (budget `{budget['name']}`, seed {result.seed})", ""]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    out += [
        "",
        f"NLL on {_examples(result)} test examples ("
        + (f"{unit} of the discrete levels" if levels else f"{unit} per example, ± one standard error")
        + "); estimators:",
        *estimators,
        "",
    ]
    what = "Fréchet distance in the digits classifier's features" if fd else "sliced Wasserstein-2 and MMD"
    out.append(
        f"Sample quality: {what} between {budget['num_generated']} samples and "
        f"{budget['num_reference']} test examples. "
        f"Times in seconds on {budget['device']} with {budget['torch_threads']} torch thread(s); "
        "training time includes validation. NFE/sample: forward calls of the method's networks per sample."
        + (" Modes: modes captured (share of samples within 3 std of a mode)." if mixture else "")
    )
    return "\n".join(out) + "\n"


def _examples(result: Any) -> str:
    n = {row["nll"]["num_examples"] for row in result.rows if row["status"] == "ok" and "nll" in row}
    return "/".join(str(v) for v in sorted(n)) or str(result.budget["nll_examples"] or "all")


def save_panel(result: Any, path: str | os.PathLike) -> Path:
    """Data next to each method's samples (failed rows left out): scatters or image grids."""
    done = [row["method"] for row in result.rows if row["method"] in result.samples]
    title = f"{result.data}: data and samples (budget {result.budget['name']})"
    if result.kind == "image":
        test = _test(result)
        panels = {
            "data (test)": test.x,
            **{k: result.samples[k] for k in ("independent pixels", *done) if k in result.samples},
        }
        shape = test.event_shape
        if test.num_levels is not None:
            value_range = (0.0, float(test.num_levels - 1))
        else:
            value_range = (float(test.x.min()), float(test.x.max()))
        return save_image_panel(panels, path, image_shape=shape, value_range=value_range, title=title)
    test = _test(result)
    lim = 4.5 if result.data in TOYS else 1.1 * float(test.x.abs().max())
    n = result.budget["num_generated"]
    panels = {"data (test)": test.x[:n], **{k: result.samples[k] for k in done}}
    return save_scatter_panel(panels, path, lim=lim, title=title)


def _test(result: Any):
    return load_dataset(result.data, "test", form="int")


def write_report(result: Any, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``compare.md``, ``compare.json`` and ``compare.png`` into ``out_dir``; return their paths.

    The panel is drawn last and its failure (e.g. samples that are not 2-D points nor images)
    is recorded in the JSON rather than raised, so the table is always written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": str(out / "compare.md"), "json": str(out / "compare.json")}
    atomic_write_bytes(paths["markdown"], markdown_table(result).encode())
    try:
        paths["png"] = str(save_panel(result, out / "compare.png"))
    except (ValueError, OSError) as exc:
        paths["png_error"] = f"{type(exc).__name__}: {exc}"
    result.paths = paths
    write_json_atomic(paths["json"], result.to_dict())
    return paths
