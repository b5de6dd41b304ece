"""What compression cost: exact errors and bytes, as a dict (for --json) and a rich table."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..ops.entries import module_bound2, relative
from ..store.manifest import adapter_bytes, anchor_bytes, basis_bytes, side_ks

SHARED_INIT = 0.9  # lora_A cosine above which two adapters are taken to share their init


def build_report(manifest: dict, measured: dict | None = None) -> dict:
    """The report object. Errors are sqrt(Σ err² / Σ ‖ΔW‖²) over the pairs named.

    Byte counts are of the LoRA factors only: ``bytes_original`` the sources' lora_A/lora_B,
    ``bytes_compressed`` the shared bases plus every adapter's cores and private residuals
    (``bytes_residual``, from ``--max-error``). Non-LoRA extras (heads)
    are stored verbatim and counted apart in ``bytes_extras``. After an ``add`` an old adapter's
    error is the bound sqrt(err²) + drift (``exact`` false) unless ``measured`` — exact
    {adapter: {module: (err², norm²)}} from ``report --against`` — gives the exact figure.
    """
    measured = measured or {}
    modules = manifest["modules"]
    bases = basis_bytes(manifest)
    coef_bytes = residual_bytes = 0
    total_err2 = total_norm2 = 0.0
    adapters = []
    for entry in manifest["adapters"]:
        per_module = {}
        exact = measured.get(entry["name"])
        pairs = {}
        own_cores, own_residual = adapter_bytes(manifest, entry)
        coef_bytes += own_cores
        for name, mod in entry["modules"].items():
            pairs[name] = exact[name] if exact else (module_bound2(mod), mod["norm2"])
            per_module[name] = relative(*pairs[name])
        err2 = sum(e for e, _ in pairs.values())
        norm2 = sum(n for _, n in pairs.values())
        total_err2 += err2
        total_norm2 += norm2
        residual_bytes += own_residual
        adapters.append(
            {
                "name": entry["name"],
                "rank": entry["rank"],
                "p": entry.get("p"),
                "relative_error": relative(err2, norm2),
                "max_module_error": max(per_module.values(), default=0.0),
                "exact": bool(exact) or entry.get("exact", True),
                "merge_error": entry.get("merge_error", relative(err2, norm2)),
                "drift": entry.get("drift", 0.0),
                "bytes_original": entry["bytes_original"],
                "bytes_residual": own_residual,
                "init_similarity": init_similarity(entry),
                "held_out_error": held_out_error(entry),
                "modules": per_module,
            }
        )
    original = sum(e["bytes_original"] for e in manifest["adapters"])
    compressed = bases + coef_bytes + residual_bytes
    return {
        "relative_error": relative(total_err2, total_norm2),
        "energy_kept": 1.0 - total_err2 / total_norm2 if total_norm2 > 0 else 1.0,
        "bytes_original": original,
        "bytes_compressed": compressed,
        "bytes_basis": bases,
        "bytes_coefficients": coef_bytes,
        "bytes_residual": residual_bytes,
        "bytes_anchors": anchor_bytes(manifest),  # earlier generations kept for tight bounds (``ops.anchors``)
        "max_error": manifest.get("max_error"),
        "bytes_extras": sum(e.get("bytes_extras", 0) for e in manifest["adapters"]),
        "budget": (manifest.get("k_rule") or {}).get("budget"),
        "shard": manifest.get("shard"),
        "compression_ratio": original / compressed if compressed else 0.0,
        "coefficient_ratio": original / coef_bytes if coef_bytes else 0.0,
        "method": manifest.get("method"),
        "dtype": manifest.get("dtype"),
        "base_model": manifest.get("base_model"),
        "modules": {
            name: {"shape": m["shape"], "k": m["k"], "k_u": side_ks(m)[0], "k_v": side_ks(m)[1],
                   "energy_kept": m.get("energy_kept")}
            for name, m in modules.items()
        },
        "adapters": adapters,
    }


def init_similarity(entry: dict) -> float | None:
    """The median over an adapter's modules of its lora_A's largest cosine with another adapter's
    (recorded at merge, ``core.diagnostics``); None for adapters an add brought in."""
    values = sorted(m["init_cosine"] for m in entry["modules"].values() if m.get("init_cosine") is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def held_out_error(entry: dict) -> float | None:
    """The adapter's relative error on bases of the same k fit without it (leave-one-out, recorded
    at merge, ``core.diagnostics``): how well a new task like it would fit. None when not recorded."""
    mods = entry["modules"].values()
    if not mods or any(m.get("held_out_err2") is None for m in mods):
        return None
    return relative(sum(m["held_out_err2"] for m in mods), sum(m["norm2"] for m in mods))


def human_bytes(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def render(report: dict, console: Console, max_error: float | None = None) -> None:
    """A table per adapter, then the zoo's totals, for people."""
    part = report.get("shard")
    if part:
        console.print(f"[bold yellow]a partial zoo[/]: part {part['index']}/{part['count']} of a sharded merge, holding "
                      f"{len(report['modules'])} module(s); its figures cover those only. Join every part with "
                      "sharecompress combine for the zoo's")
    table = Table(title="sharecompress report", title_justify="left")
    residuals = report.get("bytes_residual", 0) > 0
    for col, just in (("adapter", "left"), ("rank", "right"), ("p", "right"), ("rel. error", "right"),
                      ("worst module", "right"), ("drift", "right")) + ((("residual", "right"),) if residuals else ()):
        table.add_column(col, justify=just)
    for a in report["adapters"]:
        bound = "" if a["exact"] else "≤ "
        err = f"{bound}{a['relative_error']:.4g}"
        if max_error is not None and a["relative_error"] > max_error:
            err = f"[bold red]{err}[/]"
        own = (human_bytes(a["bytes_residual"]) if a["bytes_residual"] else "-",) if residuals else ()
        table.add_row(escape(a["name"]), escape(str(a["rank"])), escape(str(a["p"])), err,
                      f"{bound}{a['max_module_error']:.4g}", f"{a['drift']:.3g}", *own)
    console.print(table)
    exact = all(a["exact"] for a in report["adapters"])
    if not exact:
        console.print("≤: an upper bound (the adapter moved in later adds or removes: its error where last measured, and how "
                      "far it moved since); "
                      "report --against the original adapters gives exact errors")
    ks = Counter(m["k"] for m in report["modules"].values())
    k_text = ", ".join(f"k={k} ×{n}" for k, n in sorted(ks.items()))
    console.print(
        f"zoo relative error [bold]{'' if exact else '≤ '}{report['relative_error']:.4g}[/] "
        f"(energy kept {'' if exact else '≥ '}{report['energy_kept']:.4%}), "
        f"method {escape(str(report['method']))}, stored as {escape(str(report['dtype']))}"
    )
    console.print(f"{len(report['modules'])} modules: {k_text}")
    console.print(
        f"LoRA bytes: original {human_bytes(report['bytes_original'])} → basis {human_bytes(report['bytes_basis'])} + "
        f"coefficients {human_bytes(report['bytes_coefficients'])}"
        + (f" + private residuals {human_bytes(report['bytes_residual'])}" if residuals else "")
        + f" = {human_bytes(report['bytes_compressed'])}: "
        f"[bold]{report['compression_ratio']:.2f}×[/] all-in, {report['coefficient_ratio']:.2f}× coefficients only"
    )
    if report.get("max_error") is not None:
        above = [a["name"] for a in report["adapters"] if a["relative_error"] > report["max_error"]]
        held = sum(1 for a in report["adapters"] if a["bytes_residual"])
        console.print(f"error guarantee {report['max_error']:g} per adapter (--max-error): "
                      + (f"[bold red]{len(above)} above it[/]" if above else "every adapter within it")
                      + f"; {held} adapter{' holds' if held == 1 else 's hold'} a private residual")
    if report.get("budget"):
        used = report["bytes_basis"] + report["bytes_coefficients"]  # what a budget counts: bases and cores
        console.print(f"size budget {human_bytes(report['budget'])} (merge --budget or --ratio; bases and cores): "
                      + (f"[bold red]over it by {human_bytes(used - report['budget'])}[/] "
                         "(an add with --grow auto let it grow; add --grow off reallocates k and p within it)"
                         if used > report["budget"] else "within it")
                      + (f"; private residuals ({human_bytes(report['bytes_residual'])}) come on top" if residuals else ""))
    held = [(a["held_out_error"], a["merge_error"]) for a in report["adapters"] if a.get("held_out_error") is not None]
    if held:
        outside = sorted(h for h, _ in held)[len(held) // 2]
        inside = sorted(e for _, e in held)[len(held) // 2]
        console.print(
            f"held out (at merge, {len(held)} adapter{'' if len(held) == 1 else 's'}): median error {outside:.4g} on bases of the same k fit without "
            f"the adapter, against {inside:.4g} with it: how far an adapter trained apart from the others lies "
            "outside their subspace"
        )
    twins = [a["name"] for a in report["adapters"] if (a.get("init_similarity") or 0.0) >= SHARED_INIT]
    if len(twins) >= 2:
        console.print(
            f"[bold]note[/]: the lora_A of {len(twins)} of {len(report['adapters'])} adapters nearly equals another's "
            f"(cosine ≥ {SHARED_INIT}, median over modules): they share an initialisation, so part of what the bases "
            "share is that common start, not learned structure; a new task trained from another seed will fit less well"
        )
    if report.get("bytes_anchors"):
        with_anchors = report["bytes_compressed"] + report["bytes_anchors"]
        console.print(f"anchors: {human_bytes(report['bytes_anchors'])} of earlier generations kept so that the bounds of "
                      f"adapters moved by adds and removes stay tight (add --anchors N); with them the zoo takes {human_bytes(with_anchors)}, "
                      f"{report['bytes_original'] / with_anchors:.2f}× all-in")
    if report["bytes_extras"]:
        console.print(f"non-LoRA tensors kept verbatim: {human_bytes(report['bytes_extras'])} (in neither figure)")
