"""Coverage and metrics reports -> the numbers the quality gates use.

Report files are written by jobs, so they are untrusted input:

* at most :data:`MAX_REPORT_BYTES` bytes are read;
* Cobertura XML is parsed with ``defusedxml``: a document type declaration (as older Cobertura
  writers emit) is allowed, but entity declarations (the "billion laughs" expansion) and
  external entities or DTDs are refused;
* metrics JSON is parsed strictly: ``NaN``, ``Infinity``, numbers too large for a float and
  duplicate keys are refused, and :func:`~conveyor.domain.gates.flatten_metrics` bounds depth
  and size.

Every refusal is a :class:`ReportError` saying what was expected.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn
from xml.etree.ElementTree import ParseError

import defusedxml  # type: ignore[import-untyped]
import defusedxml.ElementTree as SafeElementTree  # type: ignore[import-untyped]

from conveyor.domain.gates import MetricsError, flatten_metrics
from conveyor.errors import ConveyorError

MAX_REPORT_BYTES = 50 * 1024 * 1024

_COBERTURA_HINT = (
    "write it with `coverage xml` (coverage.py) or `pytest --cov --cov-report=xml`; the root "
    'element must be <coverage line-rate="0.85" ...>'
)
_METRICS_HINT = 'write a JSON object of numbers, e.g. {"latency": {"p95": 212.5}, "errors": 0}'


_JSON_TYPES: dict[type, str] = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class ReportError(ConveyorError):
    """A coverage or metrics report cannot be used."""


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_REPORT_BYTES:
        raise ReportError(
            f"the {what} is {len(data)} bytes, more than the {MAX_REPORT_BYTES} allowed",
            hint=f"keep the {what} below {MAX_REPORT_BYTES // (1024 * 1024)} MB",
        )


def _rate(text: str | None) -> float | None:
    """A ``line-rate`` attribute as a fraction from 0 to 1, or ``None``."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= 1 else None


def _counts(covered: str | None, valid: str | None) -> float | None:
    """``lines-covered / lines-valid`` as a fraction, or ``None`` when unusable."""
    if covered is None or valid is None:
        return None
    try:
        hits, lines = int(covered), int(valid)
    except ValueError:
        return None
    if lines <= 0 or not 0 <= hits <= lines:
        return None
    return hits / lines


def read_cobertura(data: bytes) -> float:
    """Line coverage in percent (0-100) of a Cobertura XML report, as coverage.py writes it.

    The root's ``line-rate`` is used; when it is missing or invalid, ``lines-covered`` /
    ``lines-valid``.

    Raises:
        ReportError: too large, not well-formed, hostile XML, or not a Cobertura report.
    """
    _check_size(data, "coverage report")
    try:
        root = SafeElementTree.fromstring(
            data, forbid_dtd=False, forbid_entities=True, forbid_external=True
        )
    except defusedxml.EntitiesForbidden:
        raise ReportError(
            "the coverage report declares XML entities, which are refused "
            "(they can expand to gigabytes or read local files)",
            hint=_COBERTURA_HINT,
        ) from None
    except defusedxml.DefusedXmlException as exc:
        raise ReportError(
            f"the coverage report uses a refused XML feature ({type(exc).__name__})",
            hint=_COBERTURA_HINT,
        ) from None
    except ParseError as exc:
        raise ReportError(
            f"the coverage report is not well-formed XML ({exc})", hint=_COBERTURA_HINT
        ) from None
    tag = str(root.tag)
    if tag != "coverage":
        raise ReportError(
            f"not a Cobertura coverage report: the root element is <{tag[:100]}>, "
            "expected <coverage>",
            hint=_COBERTURA_HINT,
        )
    rate = _rate(root.get("line-rate"))
    if rate is None:
        rate = _counts(root.get("lines-covered"), root.get("lines-valid"))
    if rate is None:
        raise ReportError(
            "the Cobertura report has no usable line coverage: <coverage> needs a line-rate "
            "from 0 to 1, or lines-covered and lines-valid (more than 0 lines)",
            hint=_COBERTURA_HINT,
        )
    return round(rate * 100, 6)


class _Refused(ValueError):
    """A JSON value that strict parsing refuses."""


def _refuse_constant(name: str) -> NoReturn:
    raise _Refused(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"the number {text[:40]} is too large")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    try:
        float(value)
    except OverflowError:
        raise _Refused(f"the number {text[:40]}... is too large") from None
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"the key '{key[:100]}' appears twice in one object")
        result[key] = value
    return result


def read_metrics(data: bytes) -> dict[str, float]:
    """``{dotted.name: number}`` from a metrics JSON object (strict JSON, UTF-8).

    Raises:
        ReportError: too large, not UTF-8, not strict JSON, not an object, or too many numbers.
    """
    _check_size(data, "metrics file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ReportError(
            f"the metrics file is not UTF-8 (byte {exc.start})", hint=_METRICS_HINT
        ) from None
    try:
        document = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except _Refused as exc:
        raise ReportError(f"the metrics file is refused: {exc}", hint=_METRICS_HINT) from None
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"the metrics file is not valid JSON: {exc.msg} (line {exc.lineno}, column "
            f"{exc.colno})",
            hint=_METRICS_HINT,
        ) from None
    except RecursionError:
        raise ReportError("the metrics file is nested too deeply", hint=_METRICS_HINT) from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise ReportError(f"the metrics file is refused: {exc}", hint=_METRICS_HINT) from None
    if not isinstance(document, dict):
        raise ReportError(
            f"the metrics file holds a JSON {_JSON_TYPES.get(type(document), 'value')}, "
            "not an object",
            hint=_METRICS_HINT,
        )
    try:
        return flatten_metrics(document)
    except MetricsError as exc:
        raise ReportError(exc.message, hint=exc.hint) from None
