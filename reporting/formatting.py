"""Cell formatting (single value, or mean ± sample std (n) over seeds) and Markdown tables."""
from statistics import mean, stdev

MISSING = "—"


def spread(values: list[float], fmt_mean, fmt_std=None, unit: str = "") -> str:
    """'61.23%' for one value; '61.23 ± 0.45% (n=3)' for several (sample std, n-1)."""
    if not values:
        return MISSING
    if len(values) == 1:
        return f"{fmt_mean(values[0])}{unit}"
    return f"{fmt_mean(mean(values))} ± {(fmt_std or fmt_mean)(stdev(values))}{unit} (n={len(values)})"


def fmt_percent(fractions: list[float]) -> str:
    return spread(fractions, lambda value: f"{100 * value:.2f}", unit="%")


def fmt_points(differences: list[float]) -> str:
    """Accuracy differences (fractions) as signed percentage points: '-3.21 pts'."""
    return spread(differences, lambda value: f"{100 * value:+.2f}", lambda value: f"{100 * value:.2f}", unit=" pts")


def duration(seconds: float) -> str:
    """'12m 03s', or '1h 02m 03s' past an hour."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def fmt_duration(seconds: list[float]) -> str:
    return spread([float(s) for s in seconds if isinstance(s, (int, float))], duration)


def fmt_number(values: list, decimals: int = 0) -> str:
    """Configuration-like numbers (params, epochs): the value when every seed agrees, else mean ± std."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and len(set(numbers)) == 1:
        numbers = numbers[:1]
    return spread(numbers, lambda value: f"{value:,.{decimals}f}")


def fmt_text(values: list) -> str:
    """Distinct values in order of appearance, e.g. 'NVIDIA H100 80GB HBM3 / cpu'."""
    distinct = list(dict.fromkeys(str(value) for value in values))
    return " / ".join(distinct) if distinct else MISSING


def not_run(what: str) -> str:
    return f"_Not run: {what}._"


def markdown_table(headers: list[str], rows: list[list[str]], optional: tuple[str, ...] = ()) -> str:
    """A pipe table; `optional` columns are left out when no row has a value in them."""
    keep = [i for i, header in enumerate(headers) if header not in optional or any(row[i] != MISSING for row in rows)]

    def line(cells) -> str:
        return "| " + " | ".join(str(cells[i]).replace("|", "\\|") for i in keep) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(keep)] + [line(row) for row in rows])
